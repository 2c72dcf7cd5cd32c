"""The largest counts the tools accept, in a module that imports nothing heavy, so that the
command line checks them before torch loads."""

MAX_ITEMS = 100_000  # the most items (eval) or samples (calibrate) one run takes
MAX_REPEATS = 1000  # the most timed rounds one bench runs
