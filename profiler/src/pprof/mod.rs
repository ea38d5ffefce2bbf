//! Building pprof profiles: a string table, deduplicated functions, locations and mappings, and
//! samples with labels. [`PprofBuilder`] knows nothing of BPF or symbolization; callers hand it
//! symbolized frames.
//!
//! Conventions (see google/pprof `proto/profile.proto`): ids are 1-based and unique, a sample's
//! locations are leaf first, and a location with several lines lists the innermost inlined
//! function first and the physical function last.

pub mod proto;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub use proto::Profile;

/// One function at one source line: an element of a symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FrameLine {
    /// Demangled function name.
    pub function: String,
    /// Source file, when debug info had it.
    pub file: Option<String>,
    /// Source line, 0 when unknown.
    pub line: u32,
}

/// An object mapped into a process (or the kernel), as pprof describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappingInfo {
    pub memory_start: u64,
    pub memory_limit: u64,
    pub file_offset: u64,
    pub path: String,
    /// Hex GNU build id, empty when unknown.
    pub build_id: String,
    /// True once cprof has symbolized addresses of this mapping, so that viewers do not try to.
    pub symbolized: bool,
}

/// A label value: pprof keeps string and numeric labels apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelValue<'a> {
    Str(&'a str),
    Num(i64),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum LocationKey {
    /// A real address within a mapping (mapping 0: no mapping known).
    Address { mapping_id: u64, address: u64 },
    /// A frame that stands for something other than code (a separator, a lost stack).
    Pseudo { function_id: u64 },
}

/// Accumulates one pprof profile.
#[derive(Default)]
pub struct PprofBuilder {
    profile: Profile,
    strings: FastMap<String, i64>,
    functions: FastMap<(i64, i64), u64>,
    locations: FastMap<LocationKey, u64>,
}

impl PprofBuilder {
    /// A profile whose samples carry one value per `(type, unit)` of `sample_types`, in order.
    /// The last type is the default one (pprof's and speedscope's convention).
    #[must_use]
    pub fn new(sample_types: &[(&str, &str)], period_type: (&str, &str), period: i64) -> Self {
        let mut builder = Self::default();
        builder.profile.string_table.push(String::new());
        builder.strings.insert(String::new(), 0);
        let types = sample_types
            .iter()
            .map(|(ty, unit)| builder.value_type(ty, unit))
            .collect();
        builder.profile.sample_type = types;
        builder.profile.period_type = Some(builder.value_type(period_type.0, period_type.1));
        builder.profile.period = period;
        if let Some((ty, _)) = sample_types.last() {
            builder.profile.default_sample_type = builder.string(ty);
        }
        builder
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(ty),
            unit: self.string(unit),
        }
    }

    /// The index of `s` in the string table, adding it once.
    pub fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), id);
        id
    }

    /// Sets the wall-clock start and the length of the recording.
    pub fn set_time(&mut self, start_unix_nanos: i64, duration_nanos: i64) {
        self.profile.time_nanos = start_unix_nanos;
        self.profile.duration_nanos = duration_nanos;
    }

    /// Adds a free-text comment (`go tool pprof -comments` prints them).
    pub fn add_comment(&mut self, comment: &str) {
        let id = self.string(comment);
        self.profile.comment.push(id);
    }

    /// Adds a mapping and returns its id.
    pub fn add_mapping(&mut self, mapping: &MappingInfo) -> u64 {
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(&mapping.path);
        let build_id = self.string(&mapping.build_id);
        self.profile.mapping.push(proto::Mapping {
            id,
            memory_start: mapping.memory_start,
            memory_limit: mapping.memory_limit,
            file_offset: mapping.file_offset,
            filename,
            build_id,
            has_functions: mapping.symbolized,
            has_filenames: mapping.symbolized,
            has_line_numbers: mapping.symbolized,
            has_inline_frames: mapping.symbolized,
        });
        id
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let name = self.string(name);
        let file = file.map_or(0, |file| self.string(file));
        if let Some(&id) = self.functions.get(&(name, file)) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        self.profile.function.push(proto::Function {
            id,
            name,
            system_name: name,
            filename: file,
            start_line: 0,
        });
        self.functions.insert((name, file), id);
        id
    }

    /// The location of `address` in mapping `mapping_id` (0: none), symbolized as `lines`
    /// (innermost first; empty when unknown). Deduplicated by (mapping, address): the lines given
    /// the first time win.
    pub fn location(&mut self, mapping_id: u64, address: u64, lines: &[FrameLine]) -> u64 {
        let key = LocationKey::Address {
            mapping_id,
            address,
        };
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let line = lines
            .iter()
            .map(|frame| proto::Line {
                function_id: self.function(&frame.function, frame.file.as_deref()),
                line: i64::from(frame.line),
                column: 0,
            })
            .collect();
        self.push_location(key, mapping_id, address, line)
    }

    /// A location that shows as the function `name` and stands for no code address: separators
    /// and placeholders such as `[lost stack]`.
    pub fn pseudo_location(&mut self, name: &str) -> u64 {
        let function_id = self.function(name, None);
        let key = LocationKey::Pseudo { function_id };
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let line = vec![proto::Line {
            function_id,
            line: 0,
            column: 0,
        }];
        self.push_location(key, 0, 0, line)
    }

    fn push_location(
        &mut self,
        key: LocationKey,
        mapping_id: u64,
        address: u64,
        line: Vec<proto::Line>,
    ) -> u64 {
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(proto::Location {
            id,
            mapping_id,
            address,
            line,
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    /// Adds a sample: `locations` leaf first, one value per sample type.
    pub fn add_sample(
        &mut self,
        locations: Vec<u64>,
        values: Vec<i64>,
        labels: &[(&str, LabelValue<'_>)],
    ) {
        assert_eq!(
            values.len(),
            self.profile.sample_type.len(),
            "one value per sample type"
        );
        let label = labels
            .iter()
            .map(|(key, value)| {
                let key = self.string(key);
                match value {
                    LabelValue::Str(s) => proto::Label {
                        key,
                        str: self.string(s),
                        ..Default::default()
                    },
                    LabelValue::Num(num) => proto::Label {
                        key,
                        num: *num,
                        ..Default::default()
                    },
                }
            })
            .collect();
        self.profile.sample.push(proto::Sample {
            location_id: locations,
            value: values,
            label,
        });
    }

    /// The finished profile.
    #[must_use]
    pub fn finish(self) -> Profile {
        self.profile
    }
}

/// A hash map with [`FastHasher`], for the maps hit once per frame or label while writing a
/// profile.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// rustc's `FxHash` (as in the `rustc-hash` crate, v2): one rotate, xor and multiply per word.
/// Writing a profile hashes every frame of every stack and every label; with std's `SipHash`
/// that hashing was a third of the time of `OnCpuProfile::to_pprof` (`benches/pprof_encode.rs`).
/// `SipHash` resists keys chosen to collide; these keys are addresses, ids and names that at
/// worst a profiled process could pick to slow the writing of its own profile down.
#[derive(Clone, Copy, Default)]
pub(crate) struct FastHasher {
    hash: u64,
}

impl FastHasher {
    const K: u64 = 0xf135_7aea_2e62_a9c5;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weak; hashbrown picks buckets with them.
        self.hash.rotate_left(26)
    }
}

/// Encodes and gzips a profile, the form pprof files take on disk.
#[must_use]
pub fn encode_gzip(profile: &Profile) -> Vec<u8> {
    use std::io::Write as _;
    let raw = prost::Message::encode_to_vec(profile);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).expect("writing to a Vec cannot fail");
    gz.finish().expect("writing to a Vec cannot fail")
}

/// Decodes a pprof file, gzipped or not.
pub fn decode(bytes: &[u8]) -> Result<Profile, prost::DecodeError> {
    use std::io::Read as _;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .map_err(|err| prost::DecodeError::new(format!("gzip: {err}")))?;
        prost::Message::decode(raw.as_slice())
    } else {
        prost::Message::decode(bytes)
    }
}

/// Splits `profile` by the string label `key`: one profile per value (samples without the label
/// under `""`), each with only the locations, functions and mappings its samples use. For
/// backends that want one series per service.
#[must_use]
pub fn split_by_label(profile: &Profile, key: &str) -> Vec<(String, Profile)> {
    use std::collections::{BTreeMap, HashSet};
    let mut groups: BTreeMap<String, Vec<&proto::Sample>> = BTreeMap::new();
    for sample in &profile.sample {
        let value = profile.label_str(sample, key).unwrap_or("").to_owned();
        groups.entry(value).or_default().push(sample);
    }
    let template = Profile {
        sample_type: profile.sample_type.clone(),
        string_table: profile.string_table.clone(),
        period_type: profile.period_type.clone(),
        comment: profile.comment.clone(),
        drop_frames: profile.drop_frames,
        keep_frames: profile.keep_frames,
        time_nanos: profile.time_nanos,
        duration_nanos: profile.duration_nanos,
        period: profile.period,
        default_sample_type: profile.default_sample_type,
        ..Profile::default()
    };
    groups
        .into_iter()
        .map(|(value, samples)| {
            let locations: HashSet<u64> = samples
                .iter()
                .flat_map(|s| s.location_id.iter().copied())
                .collect();
            let location: Vec<proto::Location> = profile
                .location
                .iter()
                .filter(|l| locations.contains(&l.id))
                .cloned()
                .collect();
            let functions: HashSet<u64> = location
                .iter()
                .flat_map(|l| l.line.iter().map(|line| line.function_id))
                .collect();
            let mappings: HashSet<u64> = location.iter().map(|l| l.mapping_id).collect();
            let part = Profile {
                sample: samples.into_iter().cloned().collect(),
                location,
                function: profile
                    .function
                    .iter()
                    .filter(|f| functions.contains(&f.id))
                    .cloned()
                    .collect(),
                mapping: profile
                    .mapping
                    .iter()
                    .filter(|m| mappings.contains(&m.id))
                    .cloned()
                    .collect(),
                ..template.clone()
            };
            (value, part)
        })
        .collect()
}

/// Read access to a decoded profile for tests and summaries: the names of a sample's frames.
pub trait ProfileExt {
    /// The string at index `id` ("" when out of range).
    fn str(&self, id: i64) -> &str;
    /// Function names of a sample's stack, leaf first, inlined frames expanded.
    fn stack_names(&self, sample: &proto::Sample) -> Vec<&str>;
    /// The value of the string label `key` on `sample`.
    fn label_str(&self, sample: &proto::Sample, key: &str) -> Option<&str>;
    /// The value of the numeric label `key` on `sample`.
    fn label_num(&self, sample: &proto::Sample, key: &str) -> Option<i64>;
}

impl ProfileExt for Profile {
    fn str(&self, id: i64) -> &str {
        usize::try_from(id)
            .ok()
            .and_then(|id| self.string_table.get(id))
            .map_or("", String::as_str)
    }

    fn stack_names(&self, sample: &proto::Sample) -> Vec<&str> {
        StackNames::new(self).of(sample)
    }

    fn label_str(&self, sample: &proto::Sample, key: &str) -> Option<&str> {
        sample
            .label
            .iter()
            .find(|l| self.str(l.key) == key && l.str != 0)
            .map(|l| self.str(l.str))
    }

    fn label_num(&self, sample: &proto::Sample, key: &str) -> Option<i64> {
        sample
            .label
            .iter()
            .find(|l| self.str(l.key) == key && l.str == 0)
            .map(|l| l.num)
    }
}

/// Locations and functions of a profile by id, built once: [`ProfileExt::stack_names`] for many
/// samples (building the index per sample is quadratic in a large profile).
pub struct StackNames<'p> {
    profile: &'p Profile,
    locations: HashMap<u64, &'p proto::Location>,
    functions: HashMap<u64, &'p proto::Function>,
}

impl<'p> StackNames<'p> {
    #[must_use]
    pub fn new(profile: &'p Profile) -> Self {
        Self {
            profile,
            locations: index_by_id(&profile.location, |l| l.id),
            functions: index_by_id(&profile.function, |f| f.id),
        }
    }

    /// Function names of a sample's stack, leaf first, inlined frames expanded; "" for a
    /// location without a symbol.
    #[must_use]
    pub fn of(&self, sample: &proto::Sample) -> Vec<&'p str> {
        let mut names = Vec::new();
        for id in &sample.location_id {
            let Some(location) = self.locations.get(id) else {
                continue;
            };
            if location.line.is_empty() {
                names.push("");
            }
            for line in &location.line {
                names.push(
                    self.functions
                        .get(&line.function_id)
                        .map_or("", |f| self.profile.str(f.name)),
                );
            }
        }
        names
    }
}

fn index_by_id<T>(items: &[T], id: impl Fn(&T) -> u64) -> HashMap<u64, &T> {
    items.iter().map(|item| (id(item), item)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(function: &str, line: u32) -> FrameLine {
        FrameLine {
            function: function.into(),
            file: Some("a.c".into()),
            line,
        }
    }

    fn builder() -> PprofBuilder {
        PprofBuilder::new(
            &[("samples", "count"), ("cpu", "nanoseconds")],
            ("cpu", "nanoseconds"),
            10_000_000,
        )
    }

    #[test]
    fn string_table_starts_empty_and_dedups() {
        let mut b = builder();
        let a = b.string("hello");
        assert_eq!(b.string("hello"), a);
        let p = b.finish();
        assert_eq!(p.string_table[0], "");
        assert_eq!(p.string_table.iter().filter(|s| *s == "hello").count(), 1);
        assert_eq!(
            p.str(p.default_sample_type),
            "cpu",
            "last sample type is default"
        );
        assert_eq!(p.sample_type.len(), 2);
        assert_eq!(p.period, 10_000_000);
    }

    #[test]
    fn functions_and_locations_dedup() {
        let mut b = builder();
        let m = b.add_mapping(&MappingInfo {
            memory_start: 0x1000,
            memory_limit: 0x2000,
            path: "/bin/x".into(),
            symbolized: true,
            ..Default::default()
        });
        assert_eq!(m, 1);
        let l1 = b.location(m, 0x1100, &[line("f", 3)]);
        let l2 = b.location(m, 0x1100, &[line("f", 3)]);
        let l3 = b.location(m, 0x1200, &[line("f", 4)]);
        assert_eq!(l1, l2);
        assert_ne!(l1, l3);
        let p = b.finish();
        assert_eq!(p.location.len(), 2);
        assert_eq!(p.function.len(), 1, "same name and file is one function");
        assert!(p.mapping[0].has_functions && p.mapping[0].has_inline_frames);
    }

    #[test]
    fn inlined_frames_are_lines_of_one_location_innermost_first() {
        let mut b = builder();
        let loc = b.location(
            0,
            0x42,
            &[line("inner", 10), line("middle", 20), line("outer", 30)],
        );
        b.add_sample(vec![loc], vec![1, 10], &[]);
        let p = b.finish();
        assert_eq!(p.location[0].line.len(), 3);
        assert_eq!(p.stack_names(&p.sample[0]), ["inner", "middle", "outer"]);
    }

    #[test]
    fn unknown_frames_keep_their_address() {
        let mut b = builder();
        let loc = b.location(0, 0xdead, &[]);
        b.add_sample(vec![loc], vec![1, 10], &[]);
        let p = b.finish();
        assert_eq!(p.location[0].address, 0xdead);
        assert!(p.location[0].line.is_empty());
    }

    #[test]
    fn labels_are_str_or_num_never_both() {
        let mut b = builder();
        let loc = b.pseudo_location("[lost stack]");
        b.add_sample(
            vec![loc],
            vec![1, 10],
            &[
                ("comm", LabelValue::Str("worker")),
                ("pid", LabelValue::Num(42)),
            ],
        );
        let p = b.finish();
        let s = &p.sample[0];
        assert_eq!(p.label_str(s, "comm"), Some("worker"));
        assert_eq!(p.label_num(s, "pid"), Some(42));
        for l in &s.label {
            assert!(l.str == 0 || l.num == 0);
        }
    }

    #[test]
    #[should_panic(expected = "one value per sample type")]
    fn sample_value_count_must_match_types() {
        builder().add_sample(vec![], vec![1], &[]);
    }

    #[test]
    fn gzip_round_trip() {
        let mut b = builder();
        let loc = b.location(0, 1, &[line("f", 1)]);
        b.add_sample(vec![loc], vec![3, 30], &[]);
        b.add_comment("lost samples: 0");
        let p = b.finish();
        let bytes = encode_gzip(&p);
        assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
        assert_eq!(decode(&bytes).unwrap(), p);
    }

    #[test]
    fn split_keeps_what_each_part_uses() {
        let mut b = builder();
        let shared = b.location(0, 1, &[line("main", 1)]);
        let a = b.location(0, 2, &[line("a", 2)]);
        let c = b.location(0, 3, &[line("c", 3)]);
        b.add_sample(
            vec![a, shared],
            vec![1, 10],
            &[("process", LabelValue::Str("one"))],
        );
        b.add_sample(
            vec![c, shared],
            vec![2, 20],
            &[("process", LabelValue::Str("two"))],
        );
        b.add_sample(vec![shared], vec![4, 40], &[]);
        let p = b.finish();
        let parts = split_by_label(&p, "process");
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["", "one", "two"]);
        let (_, one) = &parts[1];
        assert_eq!(one.sample.len(), 1);
        assert_eq!(one.location.len(), 2);
        assert_eq!(one.stack_names(&one.sample[0]), ["a", "main"]);
        assert_eq!(
            (one.sample_type.len(), one.period),
            (p.sample_type.len(), p.period)
        );
        assert_eq!(decode(&encode_gzip(one)).unwrap(), *one);
    }
}
