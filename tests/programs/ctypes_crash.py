# A Python crash three calls deep: ctypes reads address 0.
import ctypes
import time

# rfh-trace finds the interpreter in the mappings it reads after exec; a
# crash in the very first milliseconds would beat it.
time.sleep(0.3)


def inner():
    ctypes.string_at(0)


def middle():
    inner()


def outer():
    middle()


outer()
