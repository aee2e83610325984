//! The line a connector asks the remote login shell to run: a POSIX `sh` that first reports
//! its process id (which is its process group's, since the SSH server makes each command a
//! session leader), starts a watchdog, then exports the job's environment and replaces itself
//! with the job's command. The process group is what a stop signals, so a job's children end
//! with it.
//!
//! The watchdog is for the connection that goes away without a stop (the gateway killed): the
//! SSH server then ends the session, but a command without a terminal gets no hangup and would
//! run on unseen. The watchdog, in the same group with its output on `/dev/null` (so it holds
//! no channel open), checks once a second that the command's parent is still the session's
//! server process (`ps -o ppid=`; where `ps` cannot say, that the process still answers
//! `kill -0`); once the command has been handed to another parent it sends the group
//! `SIGTERM`, then `SIGKILL` [`ORPHAN_GRACE`] later. It ignores `SIGTERM` itself, and dies with
//! the group's `SIGKILL` that ends every command. A network that is cut without either end
//! closing the connection is noticed by the server only as its `ClientAliveInterval` says
//! (off by default): until then the session, and the command, live on.

/// The first line of standard output a wrapped command writes, before the job's own output.
pub const PID_MARKER: &str = "capstan-remote-pid ";

/// Why a command cannot be wrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// An environment variable's name is not a shell identifier.
    #[error("environment variable name {0:?} is not a shell identifier ([A-Za-z_][A-Za-z0-9_]*)")]
    BadName(String),
    /// A value or the command holds a NUL byte, which no shell argument can.
    #[error("{0} holds a NUL byte")]
    Nul(&'static str),
}

/// Quotes `text` as one POSIX shell word.
pub fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('\'');
    for c in text.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Seconds between the watchdog's `SIGTERM` and `SIGKILL` to a group whose connection went.
pub const ORPHAN_GRACE: u32 = 5;

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The command line for the login shell: whatever that shell is, it only `exec`s `/bin/sh`
/// with the wrapper, so the process id reported is the session's.
pub fn wrap(command: &str, env: &[(String, String)]) -> Result<String, ScriptError> {
    if command.contains('\0') {
        return Err(ScriptError::Nul("the command"));
    }
    let mut inner = format!(
        "printf '{PID_MARKER}%s\\n' \"$$\"; p=$PPID; g=$$; (trap '' TERM; \
         while sleep 1; do \
         pp=$(ps -o ppid= -p \"$g\" 2>/dev/null | tr -d ' '); \
         if [ -n \"$pp\" ]; then [ \"$pp\" = \"$p\" ] || break; \
         else kill -0 \"$g\" 2>/dev/null || exit 0; kill -0 \"$p\" 2>/dev/null || break; fi; \
         done; \
         kill -TERM -\"$g\"; sleep {ORPHAN_GRACE}; kill -KILL -\"$g\") \
         </dev/null >/dev/null 2>&1 & "
    );
    for (name, value) in env {
        if !is_identifier(name) {
            return Err(ScriptError::BadName(name.clone()));
        }
        if value.contains('\0') {
            return Err(ScriptError::Nul("an environment value"));
        }
        inner.push_str(&format!("export {name}={}; ", quote(value)));
    }
    inner.push_str(&format!("exec /bin/sh -c {}", quote(command)));
    Ok(format!("exec /bin/sh -c {}", quote(&inner)))
}

/// The command that signals process group `pid` (quietly: the group may be gone already).
/// No `--` before the group: `dash`'s `kill` takes a negative number as a group without it
/// and refuses `--`.
pub fn signal_group(signal: &str, pid: u32) -> String {
    format!("kill -{signal} -{pid} 2>/dev/null; true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(line: &str) -> String {
        let output = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(line)
            .output()
            .expect("sh runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn a_quoted_word_survives_the_shell_whatever_it_holds() {
        for text in [
            "plain",
            "it's",
            "$HOME `id` \"x\" \\ ; | &",
            "",
            "a\nb",
            "'''",
        ] {
            assert_eq!(sh(&format!("printf %s {}", quote(text))), text);
        }
    }

    #[test]
    fn the_wrapper_reports_its_pid_first_then_runs_the_command_with_the_environment() {
        let line = wrap(
            "echo \"$GREETING, $WHO\"; echo done",
            &[
                ("GREETING".into(), "it's $not expanded".into()),
                ("WHO".into(), "`world`".into()),
            ],
        )
        .expect("wraps");
        let output = sh(&line);
        let mut lines = output.lines();
        let first = lines.next().expect("a first line");
        let pid = first.strip_prefix(PID_MARKER).expect("the marker");
        assert!(pid.parse::<u32>().is_ok(), "{first}");
        assert_eq!(lines.next(), Some("it's $not expanded, `world`"));
        assert_eq!(lines.next(), Some("done"));
    }

    #[tokio::test]
    async fn the_group_signal_reaches_every_process_of_the_group() {
        use capstan_testkit::wait_until;
        use std::time::Duration;
        // setsid (not a group leader here, so it does not fork) makes the shell lead a new
        // group; its background children stay in it.
        let mut leader = std::process::Command::new("setsid")
            .args(["/bin/sh", "-c", "sleep 3031 & sleep 3032 & wait"])
            .spawn()
            .expect("setsid runs");
        let group = leader.id();
        wait_until("both sleeps to start", Duration::from_secs(10), || async {
            (sleeps_in(group) == 2).then_some(())
        })
        .await;
        sh(&signal_group("TERM", group));
        let status = leader.wait().expect("the leader ends");
        assert!(!status.success());
        wait_until(
            "every sleep of the group to end",
            Duration::from_secs(10),
            || async { (sleeps_in(group) == 0).then_some(()) },
        )
        .await;
    }

    /// Live `sleep` processes in process group `group`.
    fn sleeps_in(group: u32) -> usize {
        let output = std::process::Command::new("ps")
            .args(["-g", &group.to_string(), "-o", "stat=,comm="])
            .output()
            .expect("ps runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.ends_with("sleep") && !line.trim_start().starts_with('Z'))
            .count()
    }

    #[test]
    fn a_variable_name_that_is_not_an_identifier_is_refused_before_anything_runs() {
        for name in ["", "1X", "A-B", "A;rm", "A B", "A=B"] {
            assert_eq!(
                wrap("true", &[(name.into(), "v".into())]),
                Err(ScriptError::BadName(name.into()))
            );
        }
        assert_eq!(
            wrap("true", &[("OK".into(), "a\0b".into())]),
            Err(ScriptError::Nul("an environment value"))
        );
        assert_eq!(wrap("a\0b", &[]), Err(ScriptError::Nul("the command")));
    }
}
