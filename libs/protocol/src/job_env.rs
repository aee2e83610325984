//! The environment a job's process starts with beside what its spec sets: who it is. The
//! process and anything it runs can name their job, attempt and node; and a restarted executor
//! finds what its predecessor left running by reading these back from `/proc/<pid>/environ`,
//! since children inherit them.

/// The job's id.
pub const JOB_ID: &str = "CAPSTAN_JOB_ID";
/// The attempt's number, from 1.
pub const ATTEMPT: &str = "CAPSTAN_ATTEMPT";
/// The node that runs it.
pub const NODE_ID: &str = "CAPSTAN_NODE_ID";
/// The attempt's own directory under the executor's work directory (its working directory
/// unless the spec names a `cwd`).
pub const WORK_DIR: &str = "CAPSTAN_WORK_DIR";
/// The W3C trace context of the attempt's `process` span, so the process's own spans join the
/// job's trace.
pub const TRACEPARENT: &str = "TRACEPARENT";

/// The value of `name` in `environ`, a process's environment as `/proc/<pid>/environ` holds
/// it: `NAME=value` entries separated by NUL bytes.
pub fn lookup<'a>(environ: &'a [u8], name: &str) -> Option<&'a [u8]> {
    environ.split(|b| *b == 0).find_map(|entry| {
        entry
            .strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_found_only_as_a_whole_entry_name() {
        let environ = b"CAPSTAN_NODE_ID=n10\0CAPSTAN_JOB_ID=01J\0CAPSTAN_JOB_IDX=no\0EMPTY=\0";
        assert_eq!(lookup(environ, NODE_ID), Some(&b"n10"[..]));
        assert_eq!(lookup(environ, JOB_ID), Some(&b"01J"[..]));
        assert_eq!(lookup(environ, "EMPTY"), Some(&b""[..]));
        assert_eq!(lookup(environ, ATTEMPT), None);
        assert_eq!(
            lookup(environ, "CAPSTAN_JOB"),
            None,
            "a prefix of a name is not the name"
        );
    }
}
