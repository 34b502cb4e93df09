/* dlopens the library named by argv[1] well after start (after rfh-trace
 * has read this process's mappings following exec), waits, then calls
 * into it: it crashes there. */
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    usleep(600 * 1000);
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 2;
    }
    int (*entry)(void) = (int (*)(void))dlsym(lib, "plugin_entry");
    if (!entry)
        return 2;
    /* Time for rfh-trace to learn the new mapping while we are alive. */
    usleep(300 * 1000);
    int r = entry(); /* MARK:call */
    printf("plugin returned %d\n", r);
    return 0;
}
