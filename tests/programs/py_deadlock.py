import threading, time
a = threading.Lock()
b = threading.Lock()

def ab():
    with a:
        time.sleep(0.3)
        with b:  # MARK:ab
            pass

def ba():
    with b:
        time.sleep(0.3)
        with a:  # MARK:ba
            pass

t1 = threading.Thread(target=ab)
t2 = threading.Thread(target=ba)
t1.start()
t2.start()
t1.join()  # MARK:join
