//! The cost benchmark's workloads: small C programs compiled at bench
//! time, each timing its own loop (so start-up is left out) and printing
//! the time per iteration as its last word.

use std::{path::PathBuf, process::Command};

/// Loop bodies share this frame: N iterations from argv[1], run in
/// `BATCHES` timed batches; the time per iteration of the fastest batch
/// is printed (in ns, divided by `scale`). The fastest batch is the one
/// the rest of a shared machine disturbed least.
fn timed_main(includes: &str, setup: &str, body: &str, scale: &str) -> String {
    format!(
        r#"#include <stdio.h>
#include <stdlib.h>
#include <time.h>
{includes}
#define BATCHES 10
int main(int argc, char **argv) {{
    long n = (argc > 1 ? atol(argv[1]) : 1) / BATCHES;
    double best = 1e300;
    if (n < 1)
        n = 1;
    {setup}
    for (int batch = 0; batch < BATCHES; batch++) {{
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++) {{
            {body}
        }}
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
        if (ns / n < best)
            best = ns / n;
    }}
    printf("%.3f\n", best / {scale});
    return 0;
}}
"#
    )
}

/// The C programs, as (name, source).
fn sources() -> Vec<(&'static str, String)> {
    vec![
        (
            "getppid",
            timed_main(
                "#include <unistd.h>\n#include <sys/syscall.h>",
                "",
                "syscall(SYS_getppid);",
                "1.0",
            ),
        ),
        (
            "execloop",
            timed_main(
                "#include <unistd.h>\n#include <sys/wait.h>",
                "",
                r#"pid_t p = fork();
        if (p == 0) { execl("/bin/true", "true", (char *)0); _exit(127); }
        int st;
        if (p < 0 || waitpid(p, &st, 0) != p || st != 0) return 1;"#,
                "1e3",
            ),
        ),
        (
            "segv",
            timed_main(
                r#"#include <setjmp.h>
#include <signal.h>
#include <string.h>
static sigjmp_buf env;
static void on_segv(int sig) { (void)sig; siglongjmp(env, 1); }"#,
                r#"struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, 0);"#,
                "if (sigsetjmp(env, 1) == 0) *(volatile int *)16 = 1;",
                "1.0",
            ),
        ),
        (
            "crash",
            "int main(void) { *(volatile int *)0 = 1; return 0; }\n".to_string(),
        ),
    ]
}

pub struct Workloads {
    dir: tempfile::TempDir,
}

impl Workloads {
    /// Compiles every workload into a fresh temp dir.
    pub fn build() -> Self {
        let dir = tempfile::tempdir().expect("create temp dir");
        for (name, src) in sources() {
            let c = dir.path().join(format!("{name}.c"));
            std::fs::write(&c, src).expect("write workload source");
            let ok = Command::new("cc")
                .args(["-g", "-O2"])
                .arg(&c)
                .arg("-o")
                .arg(dir.path().join(name))
                .status()
                .expect("run cc");
            assert!(ok.success(), "cc failed on {name}.c");
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, name: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.path(name));
        c.args(args);
        c
    }

    /// A C project of `n` sources and a Makefile that compiles each and
    /// links them: many short-lived processes (make, sh, cc, cc1, as, ld).
    pub fn c_project(&self, n: usize) -> PathBuf {
        let dir = self.dir.path().join("project");
        std::fs::create_dir_all(&dir).expect("create project dir");
        let mut objs = Vec::new();
        for i in 0..n {
            std::fs::write(dir.join(format!("unit{i}.c")), unit(i)).expect("write unit");
            objs.push(format!("unit{i}.o"));
        }
        let calls: String = (0..n)
            .map(|i| format!("    s += unit{i}(argc);\n"))
            .collect();
        let decls: String = (0..n).map(|i| format!("long unit{i}(long);\n")).collect();
        std::fs::write(
            dir.join("main.c"),
            format!("{decls}int main(int argc, char **argv) {{\n    (void)argv;\n    long s = 0;\n{calls}    return (int)(s & 1);\n}}\n"),
        )
        .expect("write main.c");
        objs.push("main.o".into());
        std::fs::write(
            dir.join("Makefile"),
            format!(
                "OBJS = {objs}\nCFLAGS = -O2 -g\napp: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n%.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n",
                objs = objs.join(" ")
            ),
        )
        .expect("write Makefile");
        dir
    }
}

/// One translation unit with enough code for cc1 to chew on.
fn unit(i: usize) -> String {
    let mut s = String::new();
    for f in 0..12 {
        s.push_str(&format!(
            "static long f{f}(long x) {{\n    long acc = {i};\n    for (long k = 0; k < x; k++)\n        acc = acc * 31 + (k ^ {f}) % 7;\n    return acc;\n}}\n"
        ));
    }
    let sum: String = (0..12).map(|f| format!(" + f{f}(x)")).collect();
    s.push_str(&format!(
        "long unit{i}(long x) {{\n    return 0{sum};\n}}\n"
    ));
    s
}
