//! Finding the job processes a crashed executor left running, so its restarted instance can kill
//! them.
//!
//! Every job process carries `CAPSTAN_NODE_ID`, `CAPSTAN_JOB_ID` and `CAPSTAN_WORK_DIR` (a
//! directory under the executor's work directory) in its environment, and so do its children.
//! At start-up the executor scans `/proc` for processes with this node's id, a job id and a
//! job directory under its own work directory, and kills their process groups. (Another
//! executor on the host, even one wrongly given the same node id, has another work
//! directory, and its jobs are left alone.) This costs nothing per job (no record is written when
//! a job starts), and it finds every leftover, however it was started.

use std::path::Path;

use capstan_protocol::job_env;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The process group of `pid`, from `/proc/<pid>/stat`.
fn process_group(proc_dir: &Path, pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; pgrp is field 5, the
    // third after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// True if `environ` (NUL-separated) marks a job process of `node` whose job directory is
/// under `jobs_dir`.
fn is_job_of(environ: &[u8], node: &str, jobs_dir: &Path) -> bool {
    let in_dir = job_env::lookup(environ, job_env::WORK_DIR).is_some_and(|dir| {
        let prefix = format!("{}/", jobs_dir.display());
        dir.starts_with(prefix.as_bytes())
    });
    job_env::lookup(environ, job_env::NODE_ID) == Some(node.as_bytes())
        && job_env::lookup(environ, job_env::JOB_ID).is_some()
        && in_dir
}

/// The process groups of `node`'s job processes (job directories under `jobs_dir`) under
/// `proc_dir` (normally `/proc`), leaving out `exclude` (this process).
pub fn find(proc_dir: &Path, node: &str, jobs_dir: &Path, exclude: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    let mut groups: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != exclude)
        .filter(|pid| {
            std::fs::read(proc_dir.join(pid.to_string()).join("environ"))
                .is_ok_and(|environ| is_job_of(&environ, node, jobs_dir))
        })
        .filter_map(|pid| process_group(proc_dir, pid))
        .filter(|group| *group > 1)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Kills the process groups of `node`'s leftover job processes, whose job directories are
/// under `jobs_dir`. Returns how many were killed.
pub fn reap(node: &str, jobs_dir: &Path) -> usize {
    let groups = find(Path::new("/proc"), node, jobs_dir, std::process::id());
    let mut killed = 0;
    for group in groups {
        if killpg(Pid::from_raw(group), Signal::SIGKILL).is_ok() {
            tracing::warn!(
                group,
                "killed a job process group left by a previous executor instance"
            );
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_job_processes_of_this_node_and_work_directory_are_recognised() {
        let dir = Path::new("/var/capstan/jobs");
        let job = b"PATH=/bin\0CAPSTAN_NODE_ID=n1\0CAPSTAN_JOB_ID=01J\0CAPSTAN_WORK_DIR=/var/capstan/jobs/3\0";
        assert!(is_job_of(job, "n1", dir));
        assert!(!is_job_of(job, "n2", dir));
        // Another executor's job, even under the same node id.
        assert!(!is_job_of(job, "n1", Path::new("/srv/other/jobs")));
        assert!(!is_job_of(job, "n1", Path::new("/var/capstan/job")));
        // The executor itself (and whatever started it) has a node id but no job id.
        assert!(!is_job_of(b"CAPSTAN_NODE_ID=n1\0", "n1", dir));
        assert!(!is_job_of(
            b"CAPSTAN_NODE_ID=n10\0CAPSTAN_JOB_ID=x\0CAPSTAN_WORK_DIR=/var/capstan/jobs/1\0",
            "n1",
            dir
        ));
    }

    #[test]
    fn the_process_group_of_this_process_is_readable() {
        let group = process_group(Path::new("/proc"), std::process::id());
        assert_eq!(group, Some(nix::unistd::getpgrp().as_raw()));
    }
}
