import signal, sys, time
got = []

def handler(sig, frame):
    got.append(sig)  # MARK:handler

signal.signal(signal.SIGUSR1, handler)

def wait():
    print("ready", flush=True)
    while not got:
        time.sleep(0.01)  # MARK:sleep
    sys.stdin.read(1)  # MARK:read

wait()  # MARK:module
