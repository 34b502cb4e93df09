import sys, threading, time
ev = threading.Event()

def rec(n):
    if n == 1:
        ev.wait()  # MARK:wait
    else:
        rec(n - 1)  # MARK:rec

def waiter():
    ev.wait()  # MARK:waiter

threading.Thread(target=rec, args=(200,), daemon=True).start()
threading.Thread(target=waiter, daemon=True).start()
time.sleep(0.3)
print("ready", flush=True)
sys.stdin.read(1)  # MARK:main
