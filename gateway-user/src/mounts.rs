//! Mount-table lookups: where cgroup2 and bpffs are mounted on this host. Paths are never
//! assumed: hybrid layouts put cgroup2 at /sys/fs/cgroup/unified, pure v2 at /sys/fs/cgroup.

use std::path::{Path, PathBuf};

/// Mount points of filesystems of type `fstype`, in /proc/mounts order.
pub fn mount_points(fstype: &str) -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/mounts")?;
    Ok(parse_mounts(&text, fstype))
}

fn parse_mounts(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then(|| PathBuf::from(unescape(dir)))
        })
        .collect()
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Whether `path` lies on (or is) a mount of type `fstype`.
pub fn is_on(path: &Path, fstype: &str) -> std::io::Result<bool> {
    Ok(mount_points(fstype)?.iter().any(|m| path.starts_with(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let text = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_mounts(text, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert!(parse_mounts(text, "bpf").is_empty());
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(
            parse_mounts("x /a\\040b bpf rw 0 0\n", "bpf"),
            vec![PathBuf::from("/a b")]
        );
    }
}
