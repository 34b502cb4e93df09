/* Forks a child that execs argv[1..]; waits for it. */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    pid_t pid = fork();
    if (pid == 0) {
        execv(argv[1], argv + 1);
        return 127;
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("child status %d\n", status);
    return 0;
}
