//! The pure part of a rollout plan: choosing instances by glob or list, and cutting them into
//! waves from counts or cumulative percentages. Invariant: the waves partition the chosen
//! instances exactly, in order, with no empty wave.

/// Whether `name` matches the shell-style `pattern` (`*` any run, `?` one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ni, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some(pi);
                mark = ni;
                pi += 1;
            }
            Some(&c) if c == '?' || n.get(ni) == Some(&c) => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some(s) => {
                    pi = s + 1;
                    mark += 1;
                    ni = mark;
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == '*')
}

/// The instances `spec` chooses from `all`: a comma-separated list of names or globs, in the
/// order of `all`. A listed name that does not exist is an error.
pub fn select(spec: &str, all: &[String]) -> Result<Vec<String>, String> {
    select_named(spec, all, "instance")
}

/// `select` for things called `what` (instance, host) in its messages.
pub fn select_named(spec: &str, all: &[String], what: &str) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(format!("--{what}s is empty"));
    }
    for p in &parts {
        let glob = p.contains(['*', '?']);
        if !glob && !all.iter().any(|a| a == p) {
            return Err(format!("no {what} named {p:?}"));
        }
    }
    let chosen: Vec<String> = all
        .iter()
        .filter(|a| parts.iter().any(|p| glob_match(p, a)))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(format!("--{what}s {spec:?} matches no {what}"));
    }
    Ok(chosen)
}

/// Wave sizes for `total` instances from `spec` ("1,50%,100%": each entry is the cumulative
/// number of instances done after that wave, as a count or a percentage rounded up). Entries
/// that add nothing are dropped; instances left after the last entry form a final wave.
pub fn wave_sizes(spec: Option<&str>, total: usize) -> Result<Vec<usize>, String> {
    let Some(spec) = spec else {
        return Ok(if total == 0 { vec![] } else { vec![total] });
    };
    let mut sizes = Vec::new();
    let mut done = 0usize;
    for part in spec.split(',').map(str::trim) {
        let upto = if let Some(pct) = part.strip_suffix('%') {
            let p: u64 = pct
                .parse()
                .map_err(|_| format!("wave {part:?} is not a count or a percentage"))?;
            if p == 0 || p > 100 {
                return Err(format!("wave {part:?}: a percentage is 1% to 100%"));
            }
            usize::try_from((total as u64 * p).div_ceil(100)).unwrap_or(total)
        } else {
            let n: usize = part
                .parse()
                .map_err(|_| format!("wave {part:?} is not a count or a percentage"))?;
            if n == 0 {
                return Err("a wave count is at least 1".into());
            }
            n
        };
        let upto = upto.min(total);
        if upto < done {
            return Err(format!("waves must grow: {part:?} is fewer than before"));
        }
        if upto > done {
            sizes.push(upto - done);
            done = upto;
        }
    }
    if done < total {
        sizes.push(total - done);
    }
    Ok(sizes)
}

/// Cuts `instances` into waves of `sizes`.
pub fn split(instances: &[String], sizes: &[usize]) -> Vec<Vec<String>> {
    let mut rest = instances;
    let mut out = Vec::new();
    for &s in sizes {
        let (w, r) = rest.split_at(s.min(rest.len()));
        if !w.is_empty() {
            out.push(w.to_vec());
        }
        rest = r;
    }
    out
}

// Used by the vm and agent commands too, so it lives with the CLI's other value parsers.
pub use crate::cli::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs_and_lists_choose_in_order() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*b*", "web"));
        assert!(glob_match("w?b-*1", "web-11"));
        assert!(!glob_match("web-*", "db-1"));
        assert!(!glob_match("web", "web-1"));
        let all = names(&["db-1", "web-1", "web-2", "web-3"]);
        assert_eq!(
            select("web-*", &all).unwrap(),
            names(&["web-1", "web-2", "web-3"])
        );
        assert_eq!(
            select("web-3,db-1", &all).unwrap(),
            names(&["db-1", "web-3"])
        );
        assert!(select("web-9", &all).is_err());
        assert!(select("x-*", &all).is_err());
    }

    #[test]
    fn waves_are_cumulative_and_partition_exactly() {
        assert_eq!(wave_sizes(Some("1,50%,100%"), 3).unwrap(), vec![1, 1, 1]);
        assert_eq!(wave_sizes(Some("1,50%,100%"), 8).unwrap(), vec![1, 3, 4]);
        assert_eq!(wave_sizes(Some("1"), 3).unwrap(), vec![1, 2]);
        assert_eq!(wave_sizes(None, 3).unwrap(), vec![3]);
        assert_eq!(wave_sizes(Some("1,1,100%"), 2).unwrap(), vec![1, 1]);
        assert!(wave_sizes(Some("2,1"), 5).is_err());
        assert!(wave_sizes(Some("0%"), 5).is_err());
        assert!(wave_sizes(Some("x"), 5).is_err());
        let all = names(&["a", "b", "c"]);
        assert_eq!(
            split(&all, &[1, 2]),
            vec![names(&["a"]), names(&["b", "c"])]
        );
        for n in 1..40 {
            let s = wave_sizes(Some("1,25%,50%,100%"), n).unwrap();
            assert_eq!(s.iter().sum::<usize>(), n);
            assert!(s.iter().all(|&x| x > 0));
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("soon").is_err());
    }
}
