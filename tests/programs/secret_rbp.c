/* Aims the frame pointer at a stack buffer full of "SECRETPW" and crashes:
 * a frame-pointer walk from here reads only the secret. A crash report must
 * show none of it. */
#include <string.h>

__attribute__((noinline)) void crash_with_rbp(char *p) {
    __asm__ volatile("mov %0, %%rbp\n\tmovl $0, 0\n" : : "r"(p) : "memory"); /* MARK:crash */
}

int main(void) {
    char secret[4096];
    for (size_t i = 0; i < sizeof secret; i += 8)
        memcpy(secret + i, "SECRETPW", 8);
    crash_with_rbp(secret + sizeof secret / 2);
    return secret[0];
}
