# Prints one line describing a function's line table as this interpreter
# builds it, and the line of every instruction offset as the interpreter
# itself computes it: "<major.minor> <firstlineno> <table hex> <lines>",
# lines being one entry per 2-byte code unit, "-" for none.
import sys

SRC = (
    "def f(a, b):\n"
    "    x = a + \\\n"
    "        b\n"
    "    for i in range(3):\n"
    "        x += i\n"
    "    try:\n"
    "        y = [v for v in range(x)]\n"
    "    except Exception:\n"
    "        y = None\n"
    + "\n" * 300
    + "    return (x,\n"
    "            y)\n"
)
ns = {}
exec(compile(SRC, "<fixture>", "exec"), ns)
co = ns["f"].__code__
v = sys.version_info
if v >= (3, 11):
    table = co.co_linetable
    lines = [p[0] for p in co.co_positions()]
elif v >= (3, 10):
    table = co.co_linetable
    lines = [None] * (len(co.co_code) // 2)
    for start, end, line in co.co_lines():
        for off in range(start, end, 2):
            lines[off // 2] = line
else:
    import dis
    table = co.co_lnotab
    starts = list(dis.findlinestarts(co))
    lines = []
    for off in range(0, len(co.co_code), 2):
        lines.append(max((s for s in starts if s[0] <= off), default=(0, None))[1])
print(
    "%d.%d" % (v[0], v[1]),
    co.co_firstlineno,
    table.hex(),
    ",".join("-" if l is None else str(l) for l in lines),
)
