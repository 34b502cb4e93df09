/* One crash per signal kind, chosen by argv[1]: bus, fpe, ill. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((noinline)) int bus_error(void) {
    char path[] = "/tmp/rfh-sigbus-XXXXXX";
    int fd = mkstemp(path);
    unlink(path);
    if (fd < 0 || ftruncate(fd, 4096) != 0)
        return 1;
    volatile char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return 1;
    return m[4096 + 8]; /* MARK:bus */
}

__attribute__((noinline)) int divide(int a, int b) {
    return a / b; /* MARK:fpe */
}

__attribute__((noinline)) void illegal(void) {
    __builtin_trap(); /* MARK:ill */
}

/* Results go through a volatile so no call is a tail call: main stays on the stack. */
volatile int result;

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    if (!strcmp(argv[1], "bus"))
        result = bus_error();
    else if (!strcmp(argv[1], "fpe"))
        result = divide(argc, argc - 2);
    else if (!strcmp(argv[1], "ill"))
        illegal();
    return result;
}
