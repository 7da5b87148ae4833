//! Generation artifacts (`ballast build`): a config and the BPF program that serves it,
//! content-addressed.
//!
//! File layout (little-endian): magic "BALLAST\0", format version (u32), the canonical config
//! (u64 length + JSON), the BPF object (u64 length + ELF), for format 2 only the lineage
//! record (u64 length + JSON, `lineage::LineageRecord`), then the 32-byte SHA-256 digest. A
//! generation without lineage is written as format 1, byte for byte as before lineages.
//! The digest covers the format version, the canonical config, the tables the config builds
//! (the VIPS index slots, BACKENDS, MAGLEV, exactly as loaded into the kernel), the program's
//! bytes and, with a lineage, its record and every slot's lineage (LINEAGES). The
//! tables are not stored: reading an artifact rebuilds them and recomputes the digest, so a
//! flipped byte anywhere, or a table builder that changed, is a digest mismatch. Host
//! parameters (interface, MACs, outer source) are not part of it: one artifact serves a fleet.
use std::collections::BTreeMap;
use std::path::Path;

use lb_common::maps::Lineage;

use super::{
    config::Config,
    digest::{format_digest, generation_digest, DIGEST_LEN},
    lineage::{self, LineageOptions, LineageRecord},
    program::LOAD_BALANCER,
    Generation,
};
use crate::{
    error::Context as _,
    files::{read_regular, write_atomically},
    other, Error,
};

pub const MAGIC: &[u8; 8] = b"BALLAST\0";
pub const FORMAT_VERSION: u32 = 1;
/// The format of an artifact with a lineage record.
pub const LINEAGE_FORMAT_VERSION: u32 = 2;
/// The largest artifact (or generation file) read: 64 MiB. The largest generation's artifact
/// (its canonical config and the program) takes a few MiB.
pub const MAX_ARTIFACT_BYTES: u64 = 64 << 20;

#[derive(Clone, Debug)]
pub struct Artifact {
    pub generation: Generation,
    /// The BPF object (ELF) this generation runs.
    pub program: Vec<u8>,
    pub digest: [u8; DIGEST_LEN],
    /// What it remembers of its predecessors; None: a settled (plain) generation.
    pub lineage: Option<LineageRecord>,
}

impl Artifact {
    pub fn build(config: &Config, program: &[u8]) -> crate::Result<Artifact> {
        Self::assemble(Generation::build(config)?, program, None)
    }

    /// The generation of `config` built after `previous` (what runs, or what will run before
    /// it): with a lineage, or plain when no slot changes owner.
    pub fn build_after(
        config: &Config,
        program: &[u8],
        previous: &Artifact,
        options: &LineageOptions,
    ) -> crate::Result<Artifact> {
        Self::build(config, program)?.after(previous, options)
    }

    /// This artifact's settled generation built after `previous`.
    pub fn after(&self, previous: &Artifact, options: &LineageOptions) -> crate::Result<Artifact> {
        let derived = lineage::derive(
            &self.generation,
            &previous.generation,
            &previous.digest_string(),
            previous.lineage.as_ref(),
            options,
        )?;
        Self::assemble(self.generation.clone(), &self.program, derived)
    }

    /// The digest of [`Artifact::settled`], without building it: the digest of these tables
    /// and program with no lineage part.
    pub fn settled_digest(&self) -> [u8; DIGEST_LEN] {
        if self.lineage.is_none() {
            return self.digest;
        }
        generation_digest(&self.generation, &self.program, None)
    }

    /// The same config and program without lineage: what takes over after the drain period.
    pub fn settled(&self) -> crate::Result<Artifact> {
        Self::assemble(self.generation.clone(), &self.program, None)
    }

    /// `generation` (its own lineage ignored) with `lineage`: the record and the slots' hops
    /// it gives (`lineage::slot_lineages`).
    fn assemble(
        mut generation: Generation,
        program: &[u8],
        lineage: Option<(LineageRecord, BTreeMap<u32, Lineage>)>,
    ) -> crate::Result<Artifact> {
        let (record, slots) = lineage.unzip();
        generation.lineage = slots.unwrap_or_default();
        let record_json = record.as_ref().map(LineageRecord::to_canonical_json);
        let digest = generation_digest(&generation, program, record_json.as_deref());
        Ok(Artifact { generation, program: program.to_vec(), digest, lineage: record })
    }

    pub fn digest_string(&self) -> String {
        format_digest(&self.digest)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let config = self.generation.config.to_canonical_json();
        let record = self.lineage.as_ref().map(LineageRecord::to_canonical_json);
        let mut out = Vec::with_capacity(64 + config.len() + self.program.len());
        out.extend_from_slice(MAGIC);
        let version = if record.is_some() { LINEAGE_FORMAT_VERSION } else { FORMAT_VERSION };
        out.extend_from_slice(&version.to_le_bytes());
        let mut sections = vec![config.as_bytes(), &self.program];
        sections.extend(record.as_deref().map(str::as_bytes));
        for section in sections {
            out.extend_from_slice(&(section.len() as u64).to_le_bytes());
            out.extend_from_slice(section);
        }
        out.extend_from_slice(&self.digest);
        out
    }

    /// Parses and checks an artifact; any inconsistency is an error naming it.
    pub fn from_bytes(bytes: &[u8]) -> crate::Result<Artifact> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(MAGIC.len()).ok() != Some(MAGIC.as_slice()) {
            return Err(Error::ArtifactUnreadable(
                "not a ballast generation artifact (no BALLAST magic at the start)".to_owned(),
            ));
        }
        let version = u32::from_le_bytes(reader.array()?);
        if version != FORMAT_VERSION && version != LINEAGE_FORMAT_VERSION {
            return Err(Error::ArtifactUnreadable(format!(
                "artifact format version {version}; this ballast reads versions {FORMAT_VERSION} and \
                 {LINEAGE_FORMAT_VERSION}"
            )));
        }
        let config_bytes = reader.section("config")?;
        let program = reader.section("program")?.to_vec();
        let record_bytes = if version == LINEAGE_FORMAT_VERSION { Some(reader.section("lineage")?) } else { None };
        let recorded: [u8; DIGEST_LEN] = reader.array().context("artifact digest")?;
        if reader.at != bytes.len() {
            return Err(Error::ArtifactUnreadable(format!(
                "{} bytes after the artifact's digest",
                bytes.len() - reader.at
            )));
        }
        // Rebuild before judging: a corrupt config may not even parse, and the digest covers
        // the tables built from it.
        // Only the canonical rendering is accepted, so one generation has one byte form. A
        // config that is not even text is judged like any other damage: by the digest.
        let config_json = std::str::from_utf8(config_bytes).unwrap_or("");
        let config = Config::from_canonical_json(config_json).map_err(|e| e.to_string()).and_then(|c| {
            if c.to_canonical_json() == config_json {
                Ok(c)
            } else {
                Err("not in canonical form".to_owned())
            }
        });
        // The lineage record, likewise only in its canonical rendering.
        let record: Option<Option<LineageRecord>> = match record_bytes {
            None => Some(None),
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|json| LineageRecord::from_json(json).ok().filter(|r| r.to_canonical_json() == json))
                .map(Some),
        };
        let rebuilt = config.as_ref().ok().and_then(|c| {
            let record = record.clone()?;
            let generation = Generation::build(c).ok()?;
            let lineage = match record {
                Some(record) => {
                    let slots = lineage::slot_lineages(&generation, &record).ok()?;
                    Some((record, slots))
                }
                None => None,
            };
            Self::assemble(generation, &program, lineage).ok()
        });
        let computed = rebuilt.as_ref().map(|a| a.digest);
        match (rebuilt, computed) {
            (Some(artifact), Some(digest)) if digest == recorded => Ok(artifact),
            (_, Some(digest)) => Err(Error::DigestMismatch(format!(
                "the artifact records {} but its content hashes to {}; it is corrupt or was altered",
                format_digest(&recorded),
                format_digest(&digest)
            ))),
            _ => Err(Error::DigestMismatch(format!(
                "the artifact records {} but its config does not even parse ({}); it is corrupt or was altered",
                format_digest(&recorded),
                config.err().unwrap_or_else(|| "no generation".to_owned())
            ))),
        }
    }

    pub fn read(path: &Path) -> crate::Result<Artifact> {
        let bytes = read_regular(path, MAX_ARTIFACT_BYTES, "artifact")?;
        Artifact::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }

    /// Writes atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> crate::Result<()> {
        write_atomically(path, &self.to_bytes())
    }
}

/// Either file kind, told apart by the artifact magic: an artifact, or a TOML config built
/// with this binary's program.
pub fn load_generation_file(path: &Path) -> crate::Result<Artifact> {
    load_generation_bytes(path, &read_regular(path, MAX_ARTIFACT_BYTES, "generation file")?)
}

/// [`load_generation_file`] of the bytes read from `path` (e.g. once, to check a signature).
pub fn load_generation_bytes(path: &Path, bytes: &[u8]) -> crate::Result<Artifact> {
    if bytes.starts_with(MAGIC) {
        return Artifact::from_bytes(bytes).with_context(|| format!("{}", path.display()));
    }
    if std::str::from_utf8(bytes).is_err() {
        return Err(Error::ArtifactUnreadable(format!(
            "{}: neither a ballast artifact (no BALLAST magic at the start: damaged?) nor a TOML config (not text)",
            path.display()
        )));
    }
    Artifact::build(&Config::from_file_bytes(path, bytes)?, LOAD_BALANCER)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> crate::Result<&'a [u8]> {
        let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::ArtifactUnreadable(format!(
                "artifact truncated: {} bytes wanted at offset {}, {} in the file",
                len,
                self.at,
                self.bytes.len()
            ))
        })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> crate::Result<[u8; N]> {
        let slice = self.take(N)?;
        slice.try_into().map_err(|_| other!("internal: slice of {} bytes for an array of {N}", slice.len()))
    }

    fn section(&mut self, name: &str) -> crate::Result<&'a [u8]> {
        let len = u64::from_le_bytes(self.array()?);
        let len = usize::try_from(len).with_context(|| format!("artifact {name} length {len}"))?;
        self.take(len).with_context(|| format!("artifact {name} section"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::config::EXAMPLE_CONFIG;

    fn example() -> Artifact {
        Artifact::build(&Config::from_toml_str(EXAMPLE_CONFIG).unwrap(), b"program bytes").unwrap()
    }

    #[test]
    fn round_trip_and_determinism() {
        let a = example();
        let bytes = a.to_bytes();
        assert_eq!(bytes, example().to_bytes(), "same config and program: same bytes");
        let back = Artifact::from_bytes(&bytes).unwrap();
        assert_eq!(back.digest, a.digest);
        assert_eq!(back.program, a.program);
        assert!(a.digest_string().starts_with("sha256:") && a.digest_string().len() == 7 + 64);
    }

    #[test]
    fn order_does_not_matter_content_does() {
        let config = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        let mut reordered = config.clone();
        reordered.vips.reverse();
        reordered.vips.iter_mut().for_each(|v| v.backends.reverse());
        let base = Artifact::build(&config, b"p").unwrap().digest;
        assert_eq!(Artifact::build(&reordered, b"p").unwrap().digest, base);

        let mut weight = config.clone();
        weight.vips[0].backends[0].weight += 1;
        let mut seed = config.clone();
        seed.hash_seed ^= 1;
        let mut backend = config.clone();
        backend.vips[0].backends[0].address = "10.9.9.9".parse().unwrap();
        for (what, changed) in [("weight", weight), ("seed", seed), ("backend", backend)] {
            assert_ne!(Artifact::build(&changed, b"p").unwrap().digest, base, "{what}");
        }
        assert_ne!(Artifact::build(&config, b"q").unwrap().digest, base, "program");
    }

    /// A small config built after itself with a backend fewer: a format 2 artifact, small
    /// enough for every byte of it to be flipped.
    fn with_lineage() -> Artifact {
        let backends = ["10.1.0.1", "10.1.0.2", "10.1.0.3"].map(|a| format!("{{ address = \"{a}\" }}")).join(", ");
        let config = Config::from_toml_str(&format!(
            "hash_seed = 1\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 307\nbackends = [{backends}]\n"
        ))
        .unwrap();
        let mut fewer = config.clone();
        fewer.vips[0].backends.pop();
        let previous = Artifact::build(&fewer, b"program bytes").unwrap();
        let artifact = Artifact::build_after(&config, b"program bytes", &previous, &LineageOptions::default()).unwrap();
        assert!(artifact.lineage.is_some());
        artifact
    }

    #[test]
    fn a_lineage_artifact_round_trips_as_format_2() {
        let artifact = with_lineage();
        let bytes = artifact.to_bytes();
        assert_eq!(&bytes[8..12], &LINEAGE_FORMAT_VERSION.to_le_bytes());
        assert_eq!(&example().to_bytes()[8..12], &FORMAT_VERSION.to_le_bytes(), "plain stays format 1");
        let back = Artifact::from_bytes(&bytes).unwrap();
        assert_eq!((back.digest, &back.lineage), (artifact.digest, &artifact.lineage));
        assert_eq!(back.generation.lineage, artifact.generation.lineage);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        every_flipped_byte_of_is_refused(&example());
        every_flipped_byte_of_is_refused(&with_lineage());
    }

    fn every_flipped_byte_of_is_refused(artifact: &Artifact) {
        let bytes = artifact.to_bytes();
        for (i, flip) in (0..bytes.len()).flat_map(|i| [(i, 0x01u8), (i, 0xff)]) {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            let err = Artifact::from_bytes(&bad).expect_err("a flipped byte must be refused");
            let text = format!("{err:#}");
            assert!(
                text.contains("digest mismatch")
                    || text.contains("magic")
                    || text.contains("version")
                    || text.contains("truncated")
                    || text.contains("after the artifact"),
                "byte {i} ^ {flip:#x}: {text}"
            );
        }
    }

    #[test]
    fn truncation_and_garbage_are_refused() {
        let bytes = example().to_bytes();
        for len in [0, 4, 12, 20, bytes.len() - 1] {
            assert!(Artifact::from_bytes(&bytes[..len]).is_err(), "length {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(format!("{:#}", Artifact::from_bytes(&longer).unwrap_err()).contains("after the artifact"));
    }
}
