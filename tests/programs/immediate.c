int main(void) {
    __asm__ volatile("xorl %%eax, %%eax\n\tmovl (%%rax), %%eax" ::: "rax", "memory"); /* MARK:main */
    return 0;
}
