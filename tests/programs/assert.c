#include <assert.h>
#include <stdio.h>

__attribute__((noinline)) void check_value(int v) {
    assert(v == 1); /* MARK:assert */
    printf("%d\n", v);
}

int main(int argc, char **argv) {
    (void)argv;
    check_value(argc + 1); /* MARK:main */
    return 0;
}
