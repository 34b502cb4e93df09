#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) int level3(int *p) {
    return *p + 1; /* MARK:level3 */
}

__attribute__((noinline)) int level2(int *p) {
    int r = level3(p); /* MARK:level2 */
    return r * 3;
}

__attribute__((noinline)) int level1(int *p) {
    int r = level2(p); /* MARK:level1 */
    return r - 7;
}

int main(int argc, char **argv) {
    int *p = argc > 5 ? (int *)argv : NULL;
    printf("%d\n", level1(p)); /* MARK:main */
    return 0;
}
