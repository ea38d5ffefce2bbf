//! Just enough of a BTF reader to find where a field lives in a kernel struct, so that programs
//! reading kernel memory work on any kernel with BTF (`/sys/kernel/btf/vmlinux`), without
//! compiled-in layouts. Rust eBPF has no CO-RE relocations; userspace reads offsets here and
//! passes them to the programs as globals.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>.

use std::collections::HashMap;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Anonymous structs and unions nested deeper than this are not searched (kernels nest a few).
const MAX_ANONYMOUS_NESTING: u32 = 16;
/// Members looked at by one field lookup, at most (`task_struct` has a few hundred).
const MAX_MEMBERS_SEARCHED: u32 = 100_000;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    members: Vec<Member>,
}

/// The types of one BTF blob, with the members of structs and unions.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

impl Btf {
    /// Parses the running kernel's BTF.
    pub fn kernel() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a BTF blob (native endian).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| -> Option<u16> {
            Some(u16::from_ne_bytes(data.get(at..at + 2)?.try_into().ok()?))
        };
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        if u16_at(0) != Some(0xeb9f) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let header = || -> Option<(usize, usize, usize, usize, usize)> {
            Some((
                u32_at(4)? as usize,
                u32_at(8)? as usize,
                u32_at(12)? as usize,
                u32_at(16)? as usize,
                u32_at(20)? as usize,
            ))
        };
        let (hdr_len, type_off, type_len, str_off, str_len) =
            header().ok_or(BtfError::Malformed("short header"))?;
        let types_start = hdr_len
            .checked_add(type_off)
            .ok_or(BtfError::Malformed("offset"))?;
        let types_end = types_start
            .checked_add(type_len)
            .filter(|&end| end <= data.len())
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings_start = hdr_len
            .checked_add(str_off)
            .ok_or(BtfError::Malformed("offset"))?;
        let strings = data
            .get(strings_start..strings_start.saturating_add(str_len))
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        // Type id 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            members: Vec::new(),
        }];
        let mut at = types_start;
        while at < types_end {
            let (name, info) = (u32_at(at), u32_at(at + 4));
            let (Some(name), Some(info)) = (name, info) else {
                return Err(BtfError::Malformed("truncated type"));
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let (Some(name), Some(type_id), Some(offset)) =
                            (u32_at(m), u32_at(m + 4), u32_at(m + 8))
                        else {
                            return Err(BtfError::Malformed("truncated member"));
                        };
                        let bit_offset = if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        };
                        members.push(Member {
                            name,
                            type_id,
                            bit_offset,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => 0,
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                members,
            });
        }
        let mut btf = Self {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && ty.name != 0 {
                // The first complete definition wins; forward declarations are another kind.
                let name = btf.string(ty.name).to_owned();
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Byte offset of `field` in `struct strukt`, looking through anonymous structs and unions.
    pub fn field_offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut budget = MAX_MEMBERS_SEARCHED;
        self.find_member(id, field, 0, 0, &mut budget)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoField {
                strukt: strukt.into(),
                field: field.into(),
            })
    }

    /// The bit offset of `field` in type `type_id` (at `base_bits` in the outer struct).
    /// `depth` and `budget` bound the search in a malformed blob, where a struct can be its own
    /// anonymous member or nest a chain of them that fans out.
    fn find_member(
        &self,
        type_id: u32,
        field: &str,
        base_bits: u32,
        depth: u32,
        budget: &mut u32,
    ) -> Option<u32> {
        if depth > MAX_ANONYMOUS_NESTING {
            return None;
        }
        let ty = self.types.get(type_id as usize)?;
        for m in &ty.members {
            *budget = budget.checked_sub(1)?;
            let Some(bits) = base_bits.checked_add(m.bit_offset) else {
                continue;
            };
            if m.name != 0 && self.string(m.name) == field {
                return Some(bits);
            }
            // Anonymous members are structs or unions whose fields belong to the outer struct.
            if m.name == 0
                && let Some(found) = self.find_member(m.type_id, field, bits, depth + 1, budget)
            {
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_task_struct_pid() {
        let btf = Btf::kernel().expect("this machine has /sys/kernel/btf/vmlinux");
        let pid = btf.field_offset("task_struct", "pid").unwrap();
        let tgid = btf.field_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid and tgid are adjacent in task_struct");
        assert!(pid > 100);
        // A field inside an anonymous union of struct sock_common.
        assert!(btf.field_offset("sock_common", "skc_daddr").is_ok());
        assert!(matches!(
            btf.field_offset("task_struct", "no_such_field"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.field_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    /// A blob with one struct `s` whose members are `(name offset, type id, bit offset)`;
    /// strings: "\0s\0x\0".
    fn one_struct(members: &[(u32, u32, u32)]) -> Vec<u8> {
        let mut types = Vec::new();
        for v in [1u32, (4 << 24) | members.len() as u32, 8] {
            types.extend_from_slice(&v.to_ne_bytes());
        }
        for &(name, ty, offset) in members {
            for v in [name, ty, offset] {
                types.extend_from_slice(&v.to_ne_bytes());
            }
        }
        let strings = b"\0s\0x\0";
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&v.to_ne_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn lookups_in_malformed_structs_end() {
        // An anonymous member of the struct's own type: the lookup recursed until the stack
        // overflowed.
        let btf = Btf::parse(&one_struct(&[(0, 1, 0)])).unwrap();
        assert!(matches!(
            btf.field_offset("s", "x"),
            Err(BtfError::NoField { .. })
        ));
        // Anonymous members fanning out: two of the struct's own type, 2^depth paths.
        let btf = Btf::parse(&one_struct(&[(0, 1, 0), (0, 1, 0)])).unwrap();
        assert!(btf.field_offset("s", "x").is_err());
        // Bit offsets that overflow u32 when nested.
        let btf = Btf::parse(&one_struct(&[(0, 1, u32::MAX), (3, 1, 8)])).unwrap();
        assert!(btf.field_offset("s", "x").is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(
            Btf::parse(&[
                0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f
            ])
            .is_err()
        );
        let mut header = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 24, 24, 0] {
            header.extend_from_slice(&v.to_ne_bytes());
        }
        header.extend_from_slice(&[0; 24]);
        assert!(Btf::parse(&header).is_ok(), "an empty but valid blob");
    }
}
