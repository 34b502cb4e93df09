/* A plugin for plugin_host.c: built as a shared library into a temp dir,
 * outside every directory the system's libraries live in. */
__attribute__((noinline)) int plugin_crash(volatile int *p) {
    return *p + 1; /* MARK:plugin_crash */
}

int plugin_entry(void) {
    return plugin_crash((volatile int *)0) + 1; /* MARK:plugin_entry */
}
