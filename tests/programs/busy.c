/* Spins on the CPU forever in a named function, never entering the
 * kernel. Nothing is printed. */

volatile unsigned long counter; /* volatile: the loop cannot be removed */

__attribute__((noinline)) void spin_forever(void) {
    /* One line, so that every instruction of the loop maps to it. */
    for (;;) counter++; /* MARK:spin */
}

int main(void) {
    spin_forever();
    return 0;
}
