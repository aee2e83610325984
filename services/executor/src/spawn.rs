//! Starting a job's process: `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`, a few system calls
//! in the child, then `execve`.
//!
//! This is what glibc's `posix_spawn` (and so `std::process::Command`) does, less the work a
//! job does not need. The child runs on this process's memory until it calls `execve`, on a
//! stack kept per thread, with every signal blocked. glibc's child asks for the disposition of
//! every signal and resets each handler it finds (121 `sigaction` calls per spawn). This one
//! sets back to their default action a fixed set — SIGPIPE (which every Rust program ignores,
//! and a job must not inherit ignored), SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
//! SIGCHLD, SIGWINCH, SIGALRM — and any other signal this process was found to handle, read
//! once at its first spawn. A signal outside that set which the executor was started with
//! ignored stays ignored in its jobs, as with `posix_spawn`. The clone hands back a pidfd, so
//! there is no `pidfd_open`, and the stack is not mapped and unmapped for every job.
//!
//! The child may call only async-signal-safe functions and must not touch this process's
//! allocator, locks or thread-local state: everything it needs (the program, `argv`, `envp`,
//! the directory, the descriptors) is prepared before the clone. What it does, in order:
//! - set those signals back to their default action;
//! - put its standard input, output and error in place (`dup2`);
//! - become the leader of its own process group;
//! - change to the job's directory;
//! - unblock every signal and `execve`.
//!
//! A step that fails writes its error number where the parent reads it, and the child exits
//! with 127; the parent, resumed when the child execs or exits, reaps it and reports the error.
//!
//! A job that runs as another user (`--run-as`) is started through the standard library's
//! fork path instead, which drops the supplementary groups and sets the group and the user
//! before it changes directory and execs. A child sharing this process's memory must not
//! change its credentials: the kernel would mark that memory, the executor's, with them
//! (undumpable, or open to the job's user while the child runs).
//!
//! The parent waits for the process on its pidfd (readable once it exits) and reaps it with
//! `waitpid`. A `Process` dropped before it was reaped is reaped in the background. The
//! environment, which may hold a job's secrets, is zeroed in this process's memory once the
//! process has it.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use zeroize::Zeroize;

use crate::runner::JobUser;

/// A process to start: the program, its arguments, environment, directory and user.
pub struct Launch {
    program: CString,
    argv: Vec<CString>,
    env: BTreeMap<OsString, OsString>,
    cwd: CString,
    stdin_piped: bool,
    user: Option<JobUser>,
}

/// A started process: its id, the parent's ends of its pipes, and its exit once reaped.
#[derive(Debug)]
pub struct Process {
    pid: libc::pid_t,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// Reaped in the background, its owner gone: not handed on again when dropped.
    orphan: bool,
    /// The process's standard input, when it was asked for as a pipe.
    pub stdin: Option<pipe::Sender>,
    /// The process's standard output.
    pub stdout: Option<pipe::Receiver>,
    /// The process's standard error.
    pub stderr: Option<pipe::Receiver>,
}

/// Where the child reports the step that failed, read by the parent once the child has
/// exec'd or exited.
#[repr(C)]
struct Report {
    step: c_int,
    errno: c_int,
}

/// Everything the child reads, prepared by the parent.
#[repr(C)]
struct ChildArgs {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    signals: *const c_int,
    signal_count: usize,
    report: *mut Report,
}

/// The child's last step, `execve`: its failure is reported as the error alone, as the
/// standard library reports a program that cannot run.
const EXECUTE: c_int = 4;

/// The steps of the child, as reported.
const STEPS: [&str; 5] = [
    "reset signals",
    "set up standard input and output",
    "start a process group",
    "change to the job's directory",
    "execute the program",
];

/// The child's stack: enough for a few system calls; kept per thread, since a thread is
/// suspended while its child runs on it.
const STACK_WORDS: usize = 64 * 1024 / 16;

thread_local! {
    static STACK: Cell<Option<Box<[u128]>>> = const { Cell::new(None) };
}

impl Launch {
    /// `program` (a path, looked up already) started as `arg0` with `args`, in `cwd`, with no
    /// environment but what `env` adds.
    pub fn new(program: &Path, arg0: &str, args: &[String], cwd: &Path) -> io::Result<Self> {
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(c_string(arg0.as_bytes())?);
        for arg in args {
            argv.push(c_string(arg.as_bytes())?);
        }
        Ok(Self {
            program: c_string(program.as_os_str().as_bytes())?,
            argv,
            env: BTreeMap::new(),
            cwd: c_string(cwd.as_os_str().as_bytes())?,
            stdin_piped: false,
            user: None,
        })
    }

    /// Sets an environment variable; a later value for the same name replaces an earlier one.
    pub fn env(&mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        if let Some(replaced) = self
            .env
            .insert(name.as_ref().to_owned(), value.as_ref().to_owned())
        {
            replaced.into_vec().zeroize();
        }
        self
    }

    /// Standard input as a pipe (`Process::stdin`) rather than `/dev/null`.
    pub fn stdin_piped(&mut self, piped: bool) -> &mut Self {
        self.stdin_piped = piped;
        self
    }

    /// Runs the process as `user`, with no supplementary group.
    pub fn user(&mut self, user: Option<JobUser>) -> &mut Self {
        self.user = user;
        self
    }

    /// Starts the process. Must be called inside a Tokio runtime (its pipes and pidfd are
    /// registered with it).
    pub fn spawn(&self) -> io::Result<Process> {
        if let Some(user) = self.user {
            return self.spawn_as(user);
        }
        let mut envp = Scrubbed(Vec::with_capacity(self.env.len()));
        for (name, value) in &self.env {
            let mut entry = Vec::with_capacity(name.len() + value.len() + 2);
            entry.extend_from_slice(name.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            entry.push(0);
            // No copy: the entry becomes the C string, or is zeroed if it cannot.
            let entry = CString::from_vec_with_nul(entry).map_err(|refused| {
                refused.into_bytes().zeroize();
                nul_error()
            })?;
            envp.0.push(entry);
        }
        let argv_ptrs = null_terminated(&self.argv);
        let envp_ptrs = null_terminated(&envp.0);

        let (stdout_read, stdout_write) = pipe_pair()?;
        let (stderr_read, stderr_write) = pipe_pair()?;
        let (stdin_read, stdin_write) = if self.stdin_piped {
            let (read, write) = pipe_pair()?;
            (Some(read), Some(write))
        } else {
            (None, None)
        };
        let stdin_fd = match &stdin_read {
            Some(read) => read.as_raw_fd(),
            None => dev_null()?,
        };
        let signals = handled_signals();
        let mut report = Report { step: -1, errno: 0 };
        let mut args = ChildArgs {
            program: self.program.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: envp_ptrs.as_ptr(),
            cwd: self.cwd.as_ptr(),
            stdin: stdin_fd,
            stdout: stdout_write.as_raw_fd(),
            stderr: stderr_write.as_raw_fd(),
            signals: signals.as_ptr(),
            signal_count: signals.len(),
            report: &raw mut report,
        };

        let mut stack = STACK
            .with(Cell::take)
            .unwrap_or_else(|| vec![0u128; STACK_WORDS].into_boxed_slice());
        let mut pidfd: c_int = -1;
        // SAFETY: the child runs `child_main` on `stack`, which this thread does not touch
        // until the clone returns (CLONE_VFORK suspends it until the child execs or exits);
        // every pointer in `args` stays valid meanwhile, as the values it points to live on
        // this frame. All signals are blocked around the clone, so no handler of this process
        // runs in the child before it resets them. The previous mask is restored after.
        let pid = unsafe {
            // Every signal, glibc's own included (its `sigfillset` leaves those out), as its
            // `posix_spawn` blocks them; the raw call, as the wrappers would not.
            let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            all.as_mut_ptr().write_bytes(0xff, 1);
            let all = all.assume_init();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            set_mask(&raw const all, &raw mut previous);
            let top = stack.as_mut_ptr().add(stack.len()).cast::<c_void>();
            let pid = libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                (&raw mut args).cast::<c_void>(),
                &raw mut pidfd,
            );
            let clone_error = io::Error::last_os_error();
            set_mask(&raw const previous, std::ptr::null_mut());
            if pid < 0 {
                STACK.with(|kept| kept.set(Some(stack)));
                return Err(clone_error);
            }
            pid
        };
        STACK.with(|kept| kept.set(Some(stack)));
        // SAFETY: the kernel wrote a new descriptor there (CLONE_PIDFD); it is ours alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        // SAFETY: written by the child, which has exec'd or exited by now.
        let report = unsafe { std::ptr::read_volatile(&raw const report) };
        // The child's ends are its own now (or it is gone).
        drop((stdout_write, stderr_write, stdin_read));

        if report.step >= 0 {
            let mut status = 0;
            // SAFETY: our child, exited; reaped here so that it leaves no zombie.
            unsafe { libc::waitpid(pid, &raw mut status, 0) };
            let step = usize::try_from(report.step)
                .ok()
                .and_then(|step| STEPS.get(step))
                .copied()
                .unwrap_or("start");
            let error = io::Error::from_raw_os_error(report.errno);
            return Err(if report.step == EXECUTE {
                error
            } else {
                io::Error::new(error.kind(), format!("cannot {step}: {error}"))
            });
        }
        register(pid, pidfd, stdout_read, stderr_read, stdin_write)
    }

    /// Starts the process as `user`, through the standard library's fork path (see the module
    /// documentation), and follows it as one of ours.
    fn spawn_as(&self, user: JobUser) -> io::Result<Process> {
        use std::os::unix::process::CommandExt;
        use std::process::Stdio;
        let text = |c: &CString| OsStr::from_bytes(c.as_bytes()).to_owned();
        let mut command = std::process::Command::new(text(&self.program));
        command
            .arg0(text(&self.argv[0]))
            .args(self.argv[1..].iter().map(text))
            .env_clear()
            .envs(&self.env)
            .current_dir(text(&self.cwd))
            .stdin(if self.stdin_piped {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .uid(user.uid)
            .gid(user.gid);
        let mut child = command.spawn()?;
        let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
        let pipes = (child.stdout.take(), child.stderr.take());
        let stdin = child.stdin.take().map(OwnedFd::from);
        // Dropping the standard library's handle neither kills nor reaps: the pidfd follows
        // the process from here.
        drop(child);
        let (Some(stdout), Some(stderr)) = pipes else {
            kill_and_reap(pid);
            return Err(io::Error::other("the process's output is not piped"));
        };
        // SAFETY: asks for a pidfd of our own child, not reaped yet.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_long) };
        if pidfd < 0 {
            let error = io::Error::last_os_error();
            kill_and_reap(pid);
            return Err(error);
        }
        let pidfd = RawFd::try_from(pidfd).expect("descriptors fit in an int");
        // SAFETY: the descriptor `pidfd_open` just returned, ours alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        register(pid, pidfd, stdout.into(), stderr.into(), stdin)
    }
}

/// The parent's side of a started process, registered with the runtime: its pidfd and its
/// ends of the pipes. If that fails, the process goes.
fn register(
    pid: libc::pid_t,
    pidfd: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    stdin: Option<OwnedFd>,
) -> io::Result<Process> {
    let registered = (|| -> io::Result<_> {
        // SAFETY: an owned descriptor, held by the `AsyncFd` until it is dropped.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let stdout = pipe::Receiver::from_owned_fd_unchecked(nonblocking(stdout)?)?;
        let stderr = pipe::Receiver::from_owned_fd_unchecked(nonblocking(stderr)?)?;
        let stdin = match stdin {
            Some(write) => Some(pipe::Sender::from_owned_fd_unchecked(nonblocking(write)?)?),
            None => None,
        };
        Ok((pidfd, stdout, stderr, stdin))
    })();
    match registered {
        Ok((pidfd, stdout, stderr, stdin)) => Ok(Process {
            pid,
            pidfd: Some(pidfd),
            status: None,
            orphan: false,
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }),
        Err(error) => {
            kill_and_reap(pid);
            Err(error)
        }
    }
}

/// Kills a child started a moment ago and reaps it.
fn kill_and_reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: our own child, not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &raw mut status, 0);
    }
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The environment's names only: its values may be secrets.
        f.debug_struct("Launch")
            .field("program", &self.program)
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("stdin_piped", &self.stdin_piped)
            .field("user", &self.user)
            .finish()
    }
}

/// C strings zeroed when dropped: the environment may hold a job's secrets, which are not left
/// behind in freed memory.
struct Scrubbed(Vec<CString>);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        for entry in self.0.drain(..) {
            entry.into_bytes_with_nul().zeroize();
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        // The environment may hold a job's secrets: not left behind in freed memory.
        for (_, value) in std::mem::take(&mut self.env) {
            value.into_vec().zeroize();
        }
    }
}

impl Process {
    /// The process's id, which is also its process group's.
    pub fn id(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Waits for the process to exit and reaps it; after that, returns its status again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let Some(pidfd) = self.pidfd.as_ref() else {
                return Err(io::Error::other("the process is not being waited for"));
            };
            let mut ready = pidfd.readable().await?;
            match reap(self.pid)? {
                Some(status) => {
                    drop(ready);
                    self.status = Some(status);
                    self.pidfd = None;
                }
                None => ready.clear_ready(),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_some() || self.orphan || !matches!(reap(self.pid), Ok(None)) {
            return;
        }
        // Still running: reaped in the background when it exits.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut orphan = Process {
            pid: self.pid,
            pidfd: self.pidfd.take(),
            status: None,
            orphan: true,
            stdin: None,
            stdout: None,
            stderr: None,
        };
        runtime.spawn(async move {
            let _ = orphan.wait().await;
        });
    }
}

/// Reaps `pid`, a child of this process, if it has exited.
fn reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut raw = 0;
    // SAFETY: `pid` is a child started here and not reaped yet: nothing else in this process
    // waits for children it did not start itself.
    match unsafe { libc::waitpid(pid, &raw mut raw, libc::WNOHANG) } {
        0 => Ok(None),
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(Some(ExitStatus::from_raw(raw))),
    }
}

/// The child, between the clone and `execve`. Async-signal-safe calls only.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and untouched while this runs; every
    // call below is async-signal-safe and uses only what the parent prepared.
    unsafe {
        let args = &*arg.cast::<ChildArgs>();
        let fail = |step: c_int| -> c_int {
            (*args.report).errno = *libc::__errno_location();
            (*args.report).step = step;
            libc::_exit(127)
        };
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for index in 0..args.signal_count {
            let signal = *args.signals.add(index);
            if libc::sigaction(signal, &raw const default, std::ptr::null_mut()) != 0 {
                return fail(0);
            }
        }
        for (from, to) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
            let placed = if from == to {
                // Already in place: only its close-on-exec flag goes.
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if placed < 0 {
                return fail(1);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(2);
        }
        if libc::chdir(args.cwd) != 0 {
            return fail(3);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
        libc::execve(args.program, args.argv, args.envp);
        fail(EXECUTE)
    }
}

/// The signals the child sets back to their default action: those this process handles,
/// read once, and those a Rust service catches or ignores.
fn handled_signals() -> &'static [c_int] {
    static SIGNALS: OnceLock<Vec<c_int>> = OnceLock::new();
    SIGNALS.get_or_init(|| {
        let mut signals = vec![
            libc::SIGPIPE,
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGCHLD,
            libc::SIGWINCH,
            libc::SIGALRM,
        ];
        for signal in 1..=libc::SIGRTMAX() {
            if signals.contains(&signal) || signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            // SAFETY: reads a disposition into a zeroed struct.
            let handled = unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                libc::sigaction(signal, std::ptr::null(), &raw mut current) == 0
                    && current.sa_sigaction != libc::SIG_DFL
                    && current.sa_sigaction != libc::SIG_IGN
            };
            if handled {
                signals.push(signal);
            }
        }
        signals
    })
}

/// Sets this thread's signal mask to `*mask`, the previous one into `*previous` when given.
///
/// # Safety
/// `mask` must point to a signal set; `previous` must be null or point to room for one.
unsafe fn set_mask(mask: *const libc::sigset_t, previous: *mut libc::sigset_t) {
    // The kernel's signal set: 64 signals in 8 bytes (x86-64, arm64).
    const KERNEL_SET_BYTES: libc::c_long = 8;
    // SAFETY: upheld by the caller.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::c_long::from(libc::SIG_SETMASK),
            mask,
            previous,
            KERNEL_SET_BYTES,
        );
    }
}

/// `/dev/null`, opened once for every job's standard input.
fn dev_null() -> io::Result<RawFd> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let opened = OwnedFd::from(std::fs::File::open("/dev/null")?);
    Ok(DEV_NULL.get_or_init(|| opened).as_raw_fd())
}

/// A pipe (read end, write end), both closed on exec.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors the call writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened and are owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd`, made non-blocking: the parent's end of a pipe, read or written by the runtime.
fn nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: sets a flag on a descriptor owned here.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| nul_error())
}

fn nul_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "a NUL byte in the program, an argument, the directory or the environment",
    )
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| CStr::as_ptr(s))
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs `argv` in `cwd` with `env` and `stdin`; its status, stdout and stderr.
    async fn run(
        argv: &[&str],
        cwd: &Path,
        env: &[(&str, &str)],
        stdin: Option<&str>,
    ) -> io::Result<(ExitStatus, String, String)> {
        let args: Vec<String> = argv[1..].iter().map(|a| (*a).to_owned()).collect();
        let mut launch = Launch::new(Path::new(argv[0]), argv[0], &args, cwd)?;
        for (name, value) in env {
            launch.env(name, value);
        }
        launch.stdin_piped(stdin.is_some());
        let mut process = launch.spawn()?;
        if let (Some(mut pipe), Some(input)) = (process.stdin.take(), stdin) {
            pipe.write_all(input.as_bytes()).await?;
            drop(pipe);
        }
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = process.stdout.take().expect("stdout is piped");
        let mut stderr = process.stderr.take().expect("stderr is piped");
        let (read_out, read_err) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        read_out?;
        read_err?;
        let status = process.wait().await?;
        Ok((status, out, err))
    }

    #[tokio::test]
    async fn a_process_gets_exactly_the_environment_and_directory_it_was_given() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (status, out, _) = run(
            &["/usr/bin/env"],
            dir.path(),
            &[("B", "2"), ("A", "1"), ("B", "3")],
            None,
        )
        .await
        .expect("env runs");
        assert!(status.success());
        assert_eq!(out, "A=1\nB=3\n", "a later value replaces an earlier one");
        let (_, out, _) = run(&["/bin/pwd"], dir.path(), &[], None)
            .await
            .expect("pwd runs");
        let canonical = dir.path().canonicalize().expect("canonical");
        assert_eq!(out.trim_end(), canonical.to_string_lossy());
    }

    #[tokio::test]
    async fn a_process_leads_its_own_group_with_no_signal_blocked_sigpipe_at_its_default_and_no_inherited_descriptor()
     {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (status, stat, _) = run(&["/bin/cat", "/proc/self/stat"], dir.path(), &[], None)
            .await
            .expect("cat runs");
        assert!(status.success());
        let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 1..]
            .split_whitespace()
            .collect();
        let pid = stat.split_whitespace().next().expect("a pid");
        assert_eq!(fields[2], pid, "its process group is its own: {stat}");
        assert_ne!(
            fields[2],
            std::process::id().to_string(),
            "not the test's group"
        );

        let (_, status_file, _) = run(&["/bin/cat", "/proc/self/status"], dir.path(), &[], None)
            .await
            .expect("cat runs");
        let mask = |name: &str| {
            let line = status_file
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status_file}"));
            u64::from_str_radix(line.trim(), 16).expect("a hexadecimal mask")
        };
        assert_eq!(mask("SigBlk:"), 0, "no signal blocked");
        // Whatever this test's own environment ignores, the child starts with these at their
        // default action (SIGPIPE above all, which every Rust program ignores).
        for signal in [
            libc::SIGPIPE,
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
        ] {
            let bit = 1u64 << (signal - 1);
            assert_eq!(mask("SigIgn:") & bit, 0, "signal {signal} is ignored");
        }

        // A descriptor of this process (the standard library opens them close-on-exec), held
        // across the spawn.
        let marker = dir.path().join("marker");
        let _held = std::fs::File::create(&marker).expect("a file");
        let (_, fds, _) = run(&["/bin/ls", "-l", "/proc/self/fd"], dir.path(), &[], None)
            .await
            .expect("ls runs");
        let fds: Vec<(&str, &str)> = fds
            .lines()
            .filter_map(|line| line.split_once(" -> "))
            .filter_map(|(left, target)| Some((left.rsplit(' ').next()?, target)))
            .collect();
        assert!(fds.contains(&("0", "/dev/null")), "{fds:?}");
        let ours: Vec<&str> = fds
            .iter()
            .filter(|(fd, _)| ["1", "2"].contains(fd))
            .map(|(_, target)| *target)
            .collect();
        for (fd, target) in &fds {
            // Its output pipes only as its standard output and error (the parent's ends stay
            // with the parent); no pidfd, no file of this process.
            assert!(
                ["1", "2"].contains(fd) || !ours.contains(target),
                "a pipe leaked: {fds:?}"
            );
            assert!(!target.contains("pidfd"), "a pidfd leaked: {fds:?}");
            assert!(!target.contains("marker"), "a descriptor leaked: {fds:?}");
        }
    }

    #[tokio::test]
    async fn input_exit_codes_signals_and_standard_error_come_back_as_the_process_made_them() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (status, out, _) = run(&["/bin/cat"], dir.path(), &[], Some("hello\n"))
            .await
            .expect("cat runs");
        assert!(status.success());
        assert_eq!(out, "hello\n");
        let (status, _, err) = run(
            &["/bin/sh", "-c", "echo oops >&2; exit 3"],
            dir.path(),
            &[],
            None,
        )
        .await
        .expect("sh runs");
        assert_eq!(status.code(), Some(3));
        assert_eq!(err, "oops\n");
        let (status, _, _) = run(&["/bin/sh", "-c", "kill -9 $$"], dir.path(), &[], None)
            .await
            .expect("sh runs");
        assert_eq!(status.signal(), Some(9));
        let (_, out, _) = run(&["/bin/cat"], dir.path(), &[], None)
            .await
            .expect("cat runs");
        assert_eq!(out, "", "without input, standard input is /dev/null");
    }

    #[tokio::test]
    async fn a_program_or_directory_that_is_missing_fails_the_spawn_with_the_step_and_its_error() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let missing = run(&["/nonexistent/program"], dir.path(), &[], None)
            .await
            .expect_err("no such program");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let nowhere = dir.path().join("nowhere");
        let error = run(&["/bin/true"], &nowhere, &[], None)
            .await
            .expect_err("no such directory");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains("change to the job's directory"),
            "{error}"
        );
        let error = Launch::new(Path::new("/bin/true"), "true", &["a\0b".into()], dir.path())
            .expect_err("a NUL byte in an argument");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_process_run_as_another_user_is_that_user_and_cannot_start_where_it_cannot_reach() {
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("the user database")
            .expect("a `nobody` user");
        let user = Some(JobUser {
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
        });
        // A directory for its owner alone.
        let private = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(
            private.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("private");
        let mut launch =
            Launch::new(Path::new("/bin/true"), "true", &[], private.path()).expect("a launch");
        launch.user(user);
        let error = launch.spawn().expect_err("nobody cannot start there");
        // Run by root: the directory is entered as the job's user, after the switch. Run by
        // anyone else: the switch itself is refused.
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut launch = Launch::new(
            Path::new("/bin/sh"),
            "sh",
            &["-c".into(), "id -u; id -G".into()],
            Path::new("/"),
        )
        .expect("a launch");
        launch.user(user);
        let mut process = launch.spawn().expect("sh starts as nobody");
        let mut out = String::new();
        process
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut out)
            .await
            .expect("read");
        assert!(process.wait().await.expect("reaped").success());
        assert_eq!(out, format!("{}\n{}\n", nobody.uid, nobody.gid));
    }

    #[tokio::test]
    async fn a_process_dropped_unwaited_is_reaped_when_it_exits() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let launch = Launch::new(
            Path::new("/bin/sleep"),
            "sleep",
            &["0.2".into()],
            dir.path(),
        )
        .expect("a launch");
        let process = launch.spawn().expect("sleep starts");
        let pid = process.pid;
        drop(process);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // A zombie still has its /proc entry; a reaped process has none (or the entry
            // is another process's by now, its pid reused).
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if !stat.contains("(sleep)") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} was never reaped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
