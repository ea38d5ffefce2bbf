//! Vetting a file before blazesym parses it: headers read with `read(2)` (never mapped), and a
//! file refused (counted, never parsed) when parsing it could crash us or take unbounded memory.
//!
//! Refused:
//! - not ELF (wrong magic, or too short for a header);
//! - bigger than [`MAX_FILE_BYTES`] (4 GiB: larger than any binary with full debug info a
//!   production engineer would expect a profiler to read);
//! - malformed: the program or section header table, or a section's (offset, size), lies outside
//!   the file; a section name table over 16 MiB;
//! - a compressed section (`SHF_COMPRESSED`, or GNU `.zdebug_*`) that declares more than
//!   [`MAX_DECOMPRESSED_SECTION_BYTES`] (512 MiB) once decompressed: blazesym would allocate
//!   that much before it could find out that the data lies.
//!
//! Together with the file size cap this is the memory cap of symbolization: what blazesym
//! allocates is bounded by the decompressed sections, the rest is mapped from the file.

use std::io::{Read as _, Seek as _, SeekFrom};

use object::read::elf::{FileHeader, SectionHeader as _};
use object::{Endianness, ReadCache, ReadRef as _, elf};

use crate::symbolize::Refusal;

/// Largest file symbolized.
pub const MAX_FILE_BYTES: u64 = 4 << 30;
/// Largest size a compressed section may declare once decompressed.
pub const MAX_DECOMPRESSED_SECTION_BYTES: u64 = 512 << 20;
/// Largest section name table.
const MAX_SHSTRTAB_BYTES: u64 = 16 << 20;
/// Largest note section read for the build id.
const MAX_NOTE_BYTES: u64 = 64 << 10;

/// What vetting learned about an acceptable file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vetted {
    /// The GNU build id as lowercase hex, if the file has one.
    pub build_id: Option<String>,
    /// Whether it names other files for its debug info (`.gnu_debuglink`,
    /// `.gnu_debugaltlink`, `.debug_sup`), which blazesym would go and look for.
    pub links_to_debug_files: bool,
}

/// Vets `file` (of `size` bytes, from `fstat`).
pub fn vet(file: &std::fs::File, size: u64) -> Result<Vetted, Refusal> {
    let mut magic = [0u8; 5];
    let mut reader = file;
    if reader.seek(SeekFrom::Start(0)).is_err() || reader.read_exact(&mut magic).is_err() {
        return Err(Refusal::NotElf);
    }
    if magic[..4] != elf::ELFMAG {
        return Err(Refusal::NotElf);
    }
    if size > MAX_FILE_BYTES {
        return Err(Refusal::TooBig);
    }
    let cache = ReadCache::new(file);
    match magic[4] {
        elf::ELFCLASS64 => vet_as::<elf::FileHeader64<Endianness>>(&cache, size),
        elf::ELFCLASS32 => vet_as::<elf::FileHeader32<Endianness>>(&cache, size),
        _ => Err(Refusal::NotElf),
    }
}

/// The GNU build id of the ELF file at `path` (a trusted path: tools and tests), if it passes
/// vetting and has one.
#[must_use]
pub fn build_id_of(path: &std::path::Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    vet(&file, size).ok()?.build_id
}

fn vet_as<Elf: FileHeader<Endian = Endianness>>(
    data: &ReadCache<&std::fs::File>,
    size: u64,
) -> Result<Vetted, Refusal> {
    let malformed = |_| Refusal::Malformed;
    let header = Elf::parse(data).map_err(|_| Refusal::NotElf)?;
    let endian = header.endian().map_err(malformed)?;
    let within = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);

    let phoff: u64 = header.e_phoff(endian).into();
    let phlen = u64::from(header.e_phnum(endian)) * u64::from(header.e_phentsize(endian));
    if !within(phoff, phlen) {
        return Err(Refusal::Malformed);
    }
    let shoff: u64 = header.e_shoff(endian).into();
    let shlen = u64::from(header.e_shnum(endian)) * u64::from(header.e_shentsize(endian));
    if !within(shoff, shlen) {
        return Err(Refusal::Malformed);
    }
    let sections = header.sections(endian, data).map_err(malformed)?;
    let shstrndx = header.shstrndx(endian, data).map_err(malformed)?;
    if let Ok(strtab) = sections.section(object::SectionIndex(shstrndx as usize))
        && strtab.sh_size(endian).into() > MAX_SHSTRTAB_BYTES
    {
        return Err(Refusal::Malformed);
    }
    let mut vetted = Vetted::default();
    for section in sections.iter() {
        let (offset, len) = (
            section.sh_offset(endian).into(),
            section.sh_size(endian).into(),
        );
        if section.sh_type(endian) != elf::SHT_NOBITS && !within(offset, len) {
            return Err(Refusal::Malformed);
        }
        let name = sections.section_name(endian, section).unwrap_or_default();
        if let Some((ch, _, _)) = section.compression(endian, data).map_err(malformed)? {
            use object::read::elf::CompressionHeader as _;
            if ch.ch_size(endian).into() > MAX_DECOMPRESSED_SECTION_BYTES {
                return Err(Refusal::DecompressionTooBig);
            }
        } else if name.starts_with(b".zdebug") && len >= 12 {
            // "ZLIB" then the uncompressed size, 8 bytes big-endian.
            let head = data
                .read_bytes_at(offset, 12)
                .map_err(|()| Refusal::Malformed)?;
            if &head[..4] == b"ZLIB"
                && u64::from_be_bytes(head[4..12].try_into().unwrap())
                    > MAX_DECOMPRESSED_SECTION_BYTES
            {
                return Err(Refusal::DecompressionTooBig);
            }
        }
        if matches!(
            name,
            b".gnu_debuglink" | b".gnu_debugaltlink" | b".debug_sup"
        ) {
            vetted.links_to_debug_files = true;
        }
        if section.sh_type(endian) == elf::SHT_NOTE
            && len <= MAX_NOTE_BYTES
            && vetted.build_id.is_none()
            && let Ok(Some(mut notes)) = section.notes(endian, data)
        {
            while let Ok(Some(note)) = notes.next() {
                if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
                    vetted.build_id = Some(hex(note.desc()));
                }
            }
        }
    }
    Ok(vetted)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn vet_bytes(bytes: &[u8]) -> Result<Vetted, Refusal> {
        let mut file = tempfile();
        file.write_all(bytes).unwrap();
        vet(&file, bytes.len() as u64)
    }

    fn tempfile() -> std::fs::File {
        // An unnamed file in /tmp: gone when closed.
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .unwrap()
    }

    fn own_exe() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    /// (offset of the section header table, entry size, count) of a 64-bit little-endian ELF.
    fn section_table(bytes: &[u8]) -> (usize, usize, usize) {
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
        (shoff, usize::from(u16_at(0x3a)), usize::from(u16_at(0x3c)))
    }

    #[test]
    fn our_own_executable_passes_with_its_build_id() {
        let exe = own_exe();
        let vetted = vet_bytes(&exe).expect("a real ELF passes");
        assert!(vetted.build_id.is_some_and(|id| id.len() >= 16));
    }

    #[test]
    fn refuses_what_is_not_elf() {
        assert_eq!(vet_bytes(b""), Err(Refusal::NotElf));
        assert_eq!(vet_bytes(b"#!/bin/sh\n"), Err(Refusal::NotElf));
        assert_eq!(vet_bytes(b"\x7fELF\x02"), Err(Refusal::NotElf), "no header");
    }

    #[test]
    fn refuses_a_section_beyond_the_end_of_the_file() {
        let mut exe = own_exe();
        let (shoff, entsize, count) = section_table(&exe);
        // The last section's sh_size (offset 0x20 in an Elf64_Shdr) claims 1 TiB.
        let at = shoff + (count - 1) * entsize + 0x20;
        exe[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(vet_bytes(&exe), Err(Refusal::Malformed));
    }

    #[test]
    fn refuses_a_truncated_file() {
        let exe = own_exe();
        assert_eq!(vet_bytes(&exe[..exe.len() / 2]), Err(Refusal::Malformed));
    }

    #[test]
    fn refuses_a_compressed_section_that_expands_too_much() {
        let mut exe = own_exe();
        let (shoff, entsize, count) = section_table(&exe);
        // Turn the last non-empty section into a compressed one whose Elf64_Chdr (24 bytes, at
        // its start) claims 64 GiB of zlib data.
        let (index, offset) = (1..count)
            .rev()
            .find_map(|i| {
                let h = shoff + i * entsize;
                let kind = u32::from_le_bytes(exe[h + 4..h + 8].try_into().unwrap());
                let size = u64::from_le_bytes(exe[h + 0x20..h + 0x28].try_into().unwrap());
                let offset = u64::from_le_bytes(exe[h + 0x18..h + 0x20].try_into().unwrap());
                (kind != elf::SHT_NOBITS && size >= 24).then_some((i, offset as usize))
            })
            .unwrap();
        let h = shoff + index * entsize;
        let flags = u64::from_le_bytes(exe[h + 8..h + 16].try_into().unwrap())
            | u64::from(elf::SHF_COMPRESSED);
        exe[h + 8..h + 16].copy_from_slice(&flags.to_le_bytes());
        exe[offset..offset + 4].copy_from_slice(&elf::ELFCOMPRESS_ZLIB.to_le_bytes());
        exe[offset + 8..offset + 16].copy_from_slice(&(64u64 << 30).to_le_bytes());
        assert_eq!(vet_bytes(&exe), Err(Refusal::DecompressionTooBig));
        exe[offset + 8..offset + 16].copy_from_slice(&4096u64.to_le_bytes());
        assert!(vet_bytes(&exe).is_ok(), "a modest declared size passes");
    }

    #[test]
    fn refuses_a_file_over_the_size_cap() {
        let file = tempfile();
        std::io::Write::write_all(&mut &file, &own_exe()[..64]).unwrap();
        assert_eq!(vet(&file, MAX_FILE_BYTES + 1), Err(Refusal::TooBig));
    }
}
