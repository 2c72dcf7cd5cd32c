"""Tools built on the compiler: the `mllmc` CLI, bench, eval, calibrate, inspect and the torch
engine. Nothing below mllmc.compiler.tools imports from here."""
