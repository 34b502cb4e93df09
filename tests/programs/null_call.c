/* A call through a NULL function pointer in optimized code: the CPU jumps
 * to address 0 and faults there, with the caller's return address at [sp]
 * and no other trace of the call. */
int (*volatile callback)(int);

__attribute__((noinline)) int dispatch(int x) {
    return callback(x) + 1; /* MARK:call */
}

int main(int argc, char **argv) {
    (void)argv;
    return dispatch(argc) == 12345; /* MARK:main */
}
