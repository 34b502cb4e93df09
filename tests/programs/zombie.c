/* Forks a child that exits at once and is never reaped: a zombie. Prints
 * the child's pid, then waits to be killed. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    printf("%d\n", (int)child);
    fflush(stdout);
    for (;;)
        pause();
}
