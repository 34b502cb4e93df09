#include <stdlib.h>
#include <stdio.h>

static int *volatile poison = NULL;
volatile int sorted_calls;

__attribute__((noinline)) static int compare_items(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (x == 42 || y == 42)
        return *poison; /* MARK:compare */
    return (x > y) - (x < y);
}

__attribute__((noinline)) void sort_items(int *v, size_t n) {
    qsort(v, n, sizeof v[0], compare_items); /* MARK:sort */
    sorted_calls++; /* keeps sort_items' frame: no tail call into qsort */
}

int main(void) {
    int v[64];
    for (int i = 0; i < 64; i++)
        v[i] = (i * 37) % 64;
    sort_items(v, 64); /* MARK:main */
    printf("%d\n", v[0]);
    return 0;
}
