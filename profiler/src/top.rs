//! Rankings for the end-of-recording summary, computed from a finished pprof.

use std::collections::{HashMap, HashSet};

use crate::pprof::{Profile, ProfileExt as _, StackNames};

/// Functions ranked by samples in which they are the leaf (self) and anywhere on the stack
/// (total), as `go tool pprof -top` ranks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopFunction {
    pub name: String,
    pub self_samples: u64,
    pub total_samples: u64,
}

/// The `n` functions with the most self value in sample type `value_index`, then the most total.
/// Functions under 0.5% of the total everywhere (a stray interrupt frame) are left out, so that
/// a 70% caller with no self time is not pushed off the list by them.
#[must_use]
pub fn top_functions(profile: &Profile, value_index: usize, n: usize) -> Vec<TopFunction> {
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    let stack_names = StackNames::new(profile);
    for sample in &profile.sample {
        let count = sample.value.get(value_index).copied().unwrap_or(0) as u64;
        let names = stack_names.of(sample);
        let label = |name: &str| {
            if name.is_empty() {
                "[unknown]".to_owned()
            } else {
                name.to_owned()
            }
        };
        if let Some(leaf) = names.first() {
            by_name.entry(label(leaf)).or_default().0 += count;
        }
        let unique: HashSet<&str> = names.iter().copied().collect();
        for name in unique {
            by_name.entry(label(name)).or_default().1 += count;
        }
    }
    let mut top: Vec<_> = by_name
        .into_iter()
        .map(|(name, (self_samples, total_samples))| TopFunction {
            name,
            self_samples,
            total_samples,
        })
        .collect();
    let all: u64 = profile
        .sample
        .iter()
        .map(|s| s.value.get(value_index).copied().unwrap_or(0) as u64)
        .sum();
    top.retain(|t| t.total_samples * 200 >= all);
    top.sort_by(|a, b| {
        (b.self_samples, b.total_samples, &a.name).cmp(&(a.self_samples, a.total_samples, &b.name))
    });
    top.truncate(n);
    top
}

/// A stack ranked by value: its user frames (kernel frames left out), leaf first, joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopStack {
    pub label: String,
    pub frames: String,
    pub value: u64,
    pub count: u64,
}

/// The `n` heaviest (label, user stack) pairs by sample type `value_index`; `count_index` is
/// summed alongside. `label` names a sample (for example "comm state").
#[must_use]
pub fn top_stacks(
    profile: &Profile,
    value_index: usize,
    count_index: usize,
    n: usize,
    label: impl Fn(&crate::pprof::proto::Sample) -> String,
) -> Vec<TopStack> {
    let kernel: HashSet<u64> = profile
        .mapping
        .iter()
        .filter(|m| profile.str(m.filename) == "[kernel]")
        .map(|m| m.id)
        .collect();
    let user_only = Profile {
        location: profile
            .location
            .iter()
            .filter(|l| !kernel.contains(&l.mapping_id))
            .cloned()
            .collect(),
        ..profile.clone()
    };
    let mut by: HashMap<(String, String), (u64, u64)> = HashMap::new();
    let stack_names = StackNames::new(&user_only);
    for sample in &profile.sample {
        let names: Vec<&str> = stack_names
            .of(sample)
            .into_iter()
            .map(|n| if n.is_empty() { "?" } else { n })
            .collect();
        let frames = if names.is_empty() {
            "[kernel]".to_owned()
        } else {
            names.join(" < ")
        };
        let entry = by.entry((label(sample), frames)).or_default();
        entry.0 += sample.value.get(value_index).copied().unwrap_or(0) as u64;
        entry.1 += sample.value.get(count_index).copied().unwrap_or(0) as u64;
    }
    let mut top: Vec<_> = by
        .into_iter()
        .map(|((label, frames), (value, count))| TopStack {
            label,
            frames,
            value,
            count,
        })
        .collect();
    top.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.frames.cmp(&b.frames)));
    top.truncate(n);
    top
}

#[cfg(test)]
mod tests {
    #[test]
    fn stray_frames_do_not_push_callers_off_the_list() {
        let mut b = PprofBuilder::new(&[("samples", "count")], ("cpu", "nanoseconds"), 1);
        let leaf = b.location(0, 1, &[FrameLine::named("leaf")]);
        let caller = b.location(0, 2, &[FrameLine::named("caller")]);
        let irq = b.location(0, 3, &[FrameLine::named("irq")]);
        b.add_sample(vec![leaf, caller], vec![999], &[]);
        b.add_sample(vec![irq], vec![1], &[]);
        let names: Vec<_> = top_functions(&b.finish(), 0, 2)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["leaf", "caller"], "irq has 0.1% of the samples");
    }

    use super::*;
    use crate::pprof::{FrameLine, PprofBuilder};

    #[test]
    fn top_ranks_by_self_then_total() {
        let mut b = PprofBuilder::new(&[("samples", "count")], ("cpu", "nanoseconds"), 1);
        let leaf_a = b.location(0, 1, &[FrameLine::named("a")]);
        let leaf_b = b.location(0, 2, &[FrameLine::named("b")]);
        let main = b.location(0, 3, &[FrameLine::named("main")]);
        b.add_sample(vec![leaf_a, main], vec![70], &[]);
        b.add_sample(vec![leaf_b, main], vec![30], &[]);
        let top = top_functions(&b.finish(), 0, 10);
        let names: Vec<_> = top
            .iter()
            .map(|t| (t.name.as_str(), t.self_samples, t.total_samples))
            .collect();
        assert_eq!(names, [("a", 70, 70), ("b", 30, 30), ("main", 0, 100)]);
    }
}
