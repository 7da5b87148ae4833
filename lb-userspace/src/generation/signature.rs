//! The trust policy (`STATE_DIR/policy.toml`) and the signatures it asks for: sshsig, as
//! `ssh-keygen -Y sign -n ballast -f KEY FILE` writes it to `FILE.sig`, verified in process
//! (the `ssh-key` crate) against an `allowed_signers` file in ssh-keygen's format
//! (ssh-keygen(1), ALLOWED SIGNERS: `principals [options] keytype base64 [comment]`, the
//! options `namespaces="..."`, `valid-after=`, `valid-before=` and `cert-authority`).
//!
//! Pure: reads the files it is given, touches no kernel. What a signature covers is the bytes
//! of the file given to the command (an artifact, or a TOML config).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ssh_key::{public::KeyData, HashAlg, PublicKey, SshSig};

use crate::{
    error::{ConfigError, Context as _},
    files::{read_regular, read_regular_if_exists},
    Error,
};

/// The policy file's name in the state directory.
pub const POLICY_FILE: &str = "policy.toml";
/// The sshsig namespace signatures are made for unless the policy says otherwise.
pub const DEFAULT_NAMESPACE: &str = "ballast";
/// The largest policy, allowed_signers or signature file read.
const MAX_TRUST_FILE_BYTES: u64 = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    signatures: Option<SignaturesSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignaturesSection {
    required: bool,
    allowed_signers: PathBuf,
    namespace: Option<String>,
}

/// What the state directory's policy asks of a generation before it goes live.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// None: no policy file, or signatures not required: nothing is checked (as before policies).
    signatures: Option<Signatures>,
}

#[derive(Clone, Debug)]
struct Signatures {
    allowed_signers: PathBuf,
    namespace: String,
    signers: Vec<AllowedSigner>,
}

/// One line of an allowed_signers file.
#[derive(Clone, Debug)]
struct AllowedSigner {
    line: usize,
    principals: String,
    /// None: any namespace.
    namespaces: Option<Vec<String>>,
    valid_after: Option<u64>,
    valid_before: Option<u64>,
    key: KeyData,
}

/// Who signed a generation, and what the signature covers: for the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The signer's key fingerprint as `ssh-keygen -l` prints it (`SHA256:...`).
    pub fingerprint: String,
    /// The principals of the allowed_signers line that allowed it.
    pub principal: String,
    /// What was signed (an artifact's digest, a config file's SHA-256), and for a generation
    /// derived from it, how (the parent and what the derivation excluded).
    pub covers: String,
    /// The signature itself (`FILE.sig`), kept beside the generation for rollback.
    #[serde(skip)]
    pub signature: Vec<u8>,
    /// The bytes it signs (the artifact, or the config a generation was built from).
    #[serde(skip)]
    pub subject: Vec<u8>,
}

/// `FILE.sig`, where `ssh-keygen -Y sign` writes the signature of FILE.
pub fn signature_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

fn policy_error(path: &Path, field: &str, message: impl std::fmt::Display) -> Error {
    Error::Config(ConfigError::new(
        format!("{}: {field}", path.display()),
        format!("{message}; the trust policy is refused and nothing was changed"),
    ))
}

impl Policy {
    /// The policy of the state directory `root`: none (nothing required) without a policy file.
    pub fn load(root: &Path) -> crate::Result<Policy> {
        let path = root.join(POLICY_FILE);
        let Some(bytes) = read_regular_if_exists(&path, MAX_TRUST_FILE_BYTES, "trust policy")? else {
            return Ok(Policy::default());
        };
        Policy::parse(&path, &bytes)
    }

    /// A policy file's text; `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> crate::Result<Policy> {
        let text = std::str::from_utf8(bytes).map_err(|_| policy_error(path, "(file)", "not UTF-8 text"))?;
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| policy_error(path, &field_at(text, &e), e.message()))?;
        let Some(section) = file.signatures.filter(|s| s.required) else { return Ok(Policy::default()) };
        let namespace = section.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        if namespace.is_empty() {
            return Err(policy_error(path, "signatures.namespace", "is empty"));
        }
        let list = &section.allowed_signers;
        let bytes = read_regular(list, MAX_TRUST_FILE_BYTES, "allowed_signers file")
            .map_err(|e| policy_error(path, "signatures.allowed_signers", format!("{}: {e}", list.display())))?;
        let signers = parse_allowed_signers(&String::from_utf8_lossy(&bytes))
            .map_err(|e| policy_error(path, "signatures.allowed_signers", format!("{}: {e}", list.display())))?;
        Ok(Policy { signatures: Some(Signatures { allowed_signers: list.clone(), namespace, signers }) })
    }

    pub fn required(&self) -> bool {
        self.signatures.is_some()
    }

    /// Checks the signature (the text of `FILE.sig`, None: there is none) of `bytes`, the
    /// content of `what`. Ok(None) when the policy requires none (nothing is checked then).
    pub fn check(&self, what: &str, bytes: &[u8], signature: Option<&[u8]>) -> crate::Result<Option<Signed>> {
        let Some(policy) = &self.signatures else { return Ok(None) };
        let refused = |why: String| Error::Other(format!("{what}: {why}; signatures are required (trust policy)"));
        let Some(signature) = signature else {
            return Err(refused(format!(
                "unsigned: no signature (sign it with `ssh-keygen -Y sign -n {} -f KEY FILE`)",
                policy.namespace
            )));
        };
        let sig = SshSig::from_pem(signature)
            .map_err(|e| refused(format!("the signature is not an SSH signature (sshsig) ({e})")))?;
        if sig.namespace() != policy.namespace {
            return Err(refused(format!(
                "wrong namespace: signed for namespace '{}', the policy wants '{}'",
                sig.namespace(),
                policy.namespace
            )));
        }
        let fingerprint = sig.public_key().fingerprint(HashAlg::Sha256).to_string();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let allowed = policy.signers.iter().find(|s| {
            s.key == *sig.public_key()
                && s.namespaces.as_ref().is_none_or(|n| n.contains(&policy.namespace))
                && s.valid_after.is_none_or(|t| now >= t)
                && s.valid_before.is_none_or(|t| now < t)
        });
        let Some(allowed) = allowed else {
            let listed = policy.signers.iter().find(|s| s.key == *sig.public_key());
            let why = match listed {
                Some(s) => format!(
                    "line {} of {} allows it, but not for namespace '{}' at this time",
                    s.line,
                    policy.allowed_signers.display(),
                    policy.namespace
                ),
                None => format!("not in {}", policy.allowed_signers.display()),
            };
            return Err(refused(format!("signed by a key that is not allowed: {fingerprint} ({why})")));
        };
        PublicKey::from(allowed.key.clone()).verify(&policy.namespace, bytes, &sig).map_err(|_| {
            refused(format!(
                "the signature by {fingerprint} ({}) is for other bytes: the file changed after it was signed",
                allowed.principals
            ))
        })?;
        Ok(Some(Signed {
            fingerprint,
            principal: allowed.principals.clone(),
            covers: what.to_owned(),
            signature: signature.to_vec(),
            subject: bytes.to_vec(),
        }))
    }

    /// Reads `path` and its `path.sig` and checks them: the bytes read, and who signed them.
    pub fn check_file(&self, path: &Path, cap: u64, what: &str) -> crate::Result<(Vec<u8>, Option<Signed>)> {
        let bytes = read_regular(path, cap, what)?;
        if !self.required() {
            return Ok((bytes, None));
        }
        let sig_path = signature_path(path);
        let signature = read_regular_if_exists(&sig_path, MAX_TRUST_FILE_BYTES, "signature")
            .with_context(|| format!("reading the signature of {}", path.display()))?;
        let what = format!("{} (sha256:{})", path.display(), crate::generation::digest::hex(&sha256(&bytes)));
        let signed = self.check(&what, &bytes, signature.as_deref())?;
        Ok((bytes, signed))
    }
}

/// The field a TOML error is about: the key of the line it points at, or the one it names.
fn field_at(text: &str, error: &toml::de::Error) -> String {
    let at = error.span().map_or(0, |s| s.start).min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let named = error.message().split('`').nth(1).filter(|_| error.message().contains(" field `"));
    let key = match (line.split_once('='), named) {
        (_, Some(named)) => named.to_owned(),
        (Some((key, _)), None) => key.trim().to_owned(),
        (None, None) => return "(file)".to_owned(),
    };
    let in_section = text[..line_start].contains("[signatures]") && !line.trim_start().starts_with('[');
    if in_section {
        format!("signatures.{key}")
    } else {
        key
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Splits a line into fields at unquoted white space (quotes stay in the field).
fn fields(line: &str) -> crate::Result<Vec<&str>> {
    let (mut out, mut start, mut quoted) = (Vec::new(), None, false);
    for (i, c) in line.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&line[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if quoted {
        crate::bail!("an unterminated quote");
    }
    if let Some(s) = start {
        out.push(&line[s..]);
    }
    Ok(out)
}

/// `YYYYMMDD[HHMM[SS]]` (UTC with a trailing Z, else local time taken as UTC) to Unix seconds.
fn parse_time(text: &str) -> Option<u64> {
    let digits = text.strip_suffix(['Z', 'z']).unwrap_or(text);
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits.get(r).map_or(Some(0), |s| s.parse::<i64>().ok());
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Splits `a,b="x,y",c` at the commas outside quotes.
fn split_options(text: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

fn parse_allowed_signers(text: &str) -> crate::Result<Vec<AllowedSigner>> {
    let mut signers = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = |why: String| crate::other!("line {line}: {why}");
        let parts = fields(trimmed).map_err(|e| bad(e.to_string()))?;
        let Some((principals, rest)) = parts.split_first() else { continue };
        // The key starts at the first field that is a key type; the fields before are options.
        let at = rest
            .iter()
            .position(|f| ssh_key::Algorithm::new(f).is_ok())
            .ok_or_else(|| bad("no public key (principals [options] keytype base64)".to_owned()))?;
        let (options, key) = rest.split_at(at);
        let key_text = key.iter().take(2).copied().collect::<Vec<_>>().join(" ");
        let key =
            PublicKey::from_openssh(&key_text).map_err(|e| bad(format!("the public key does not parse ({e})")))?;
        let mut signer = AllowedSigner {
            line,
            principals: principals.trim_matches('"').to_owned(),
            namespaces: None,
            valid_after: None,
            valid_before: None,
            key: key.key_data().clone(),
        };
        let mut cert_authority = false;
        for option in options.iter().flat_map(|o| split_options(o)) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            let value = value.trim_matches('"');
            match name.to_ascii_lowercase().as_str() {
                "cert-authority" => cert_authority = true,
                "namespaces" => signer.namespaces = Some(value.split(',').map(str::to_owned).collect()),
                "valid-after" => {
                    signer.valid_after = Some(parse_time(value).ok_or_else(|| bad(format!("valid-after={value}")))?)
                }
                "valid-before" => {
                    signer.valid_before = Some(parse_time(value).ok_or_else(|| bad(format!("valid-before={value}")))?)
                }
                _ => return Err(bad(format!("unknown option '{name}'"))),
            }
        }
        // Certificates are not supported: a CA line would allow nothing, so it is refused.
        if cert_authority {
            return Err(bad("cert-authority lines are not supported (list the signing keys themselves)".to_owned()));
        }
        signers.push(signer);
    }
    Ok(signers)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    use crate::files::Scratch;

    fn ssh_keygen(args: &[&str]) {
        let out = Command::new("ssh-keygen").args(args).output().expect("ssh-keygen (openssh-client)");
        assert!(out.status.success(), "ssh-keygen {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A key made by ssh-keygen; its public line and fingerprint as ssh-keygen prints them.
    fn key(dir: &Path, name: &str, kind: &str) -> (PathBuf, String, String) {
        let path = dir.join(name);
        ssh_keygen(&["-q", "-t", kind, "-N", "", "-C", name, "-f", path.to_str().unwrap()]);
        let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
        let out = Command::new("ssh-keygen").args(["-l", "-f", path.to_str().unwrap()]).output().unwrap();
        let fingerprint = String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).unwrap().to_owned();
        (path, public.trim().to_owned(), fingerprint)
    }

    fn sign(key: &Path, namespace: &str, file: &Path) -> Vec<u8> {
        let _ = std::fs::remove_file(signature_path(file));
        ssh_keygen(&["-q", "-Y", "sign", "-n", namespace, "-f", key.to_str().unwrap(), file.to_str().unwrap()]);
        std::fs::read(signature_path(file)).unwrap()
    }

    fn policy(dir: &Path, allowed: &str) -> Policy {
        let list = dir.join("allowed_signers");
        std::fs::write(&list, allowed).unwrap();
        let text = format!("[signatures]\nrequired = true\nallowed_signers = \"{}\"\n", list.display());
        Policy::parse(&dir.join("policy.toml"), text.as_bytes()).unwrap()
    }

    #[test]
    fn signatures_by_ssh_keygen_verify_and_every_refusal_says_which() {
        let scratch = Scratch::new("sig-verify");
        let (ed, ed_pub, ed_fp) = key(&scratch.0, "ed", "ed25519");
        let (ec, ec_pub, ec_fp) = key(&scratch.0, "ec", "ecdsa");
        let (rsa, rsa_pub, rsa_fp) = key(&scratch.0, "rsa", "rsa");
        let (other, _, other_fp) = key(&scratch.0, "other", "ed25519");
        let policy = policy(
            &scratch.0,
            &format!("ops@example {ed_pub}\n# a comment\nci namespaces=\"ballast\" {ec_pub}\n\"old,key\" {rsa_pub}\n"),
        );
        let file = scratch.0.join("gen.bal");
        std::fs::write(&file, b"the generation's bytes").unwrap();

        for (key, fp, who) in [(&ed, &ed_fp, "ops@example"), (&ec, &ec_fp, "ci"), (&rsa, &rsa_fp, "old,key")] {
            let sig = sign(key, "ballast", &file);
            let signed = policy.check("gen.bal", b"the generation's bytes", Some(&sig)).unwrap().unwrap();
            assert_eq!((&signed.fingerprint, signed.principal.as_str()), (fp, who));
            let (bytes, signed) = policy.check_file(&file, 1 << 20, "generation file").unwrap();
            assert_eq!((bytes.as_slice(), signed.unwrap().fingerprint), (&b"the generation's bytes"[..], fp.clone()));
            // Other bytes.
            let err = policy.check("gen.bal", b"other bytes", Some(&sig)).unwrap_err().to_string();
            assert!(err.contains("for other bytes") && err.contains(fp.as_str()), "{err}");
        }
        let err = policy.check("gen.bal", b"x", None).unwrap_err().to_string();
        assert!(err.contains("gen.bal: unsigned"), "{err}");
        let sig = sign(&other, "ballast", &file);
        let err = policy.check("gen.bal", b"the generation's bytes", Some(&sig)).unwrap_err().to_string();
        assert!(err.contains("not allowed") && err.contains(&other_fp), "{err}");
        let sig = sign(&ed, "git", &file);
        let err = policy.check("gen.bal", b"the generation's bytes", Some(&sig)).unwrap_err().to_string();
        assert!(err.contains("wrong namespace") && err.contains("'git'"), "{err}");
        let err = policy.check("gen.bal", b"x", Some(b"not a signature")).unwrap_err().to_string();
        assert!(err.contains("not an SSH signature"), "{err}");
    }

    #[test]
    fn allowed_signers_options_limit_namespace_and_time() {
        let scratch = Scratch::new("sig-options");
        let (ed, ed_pub, _) = key(&scratch.0, "ed", "ed25519");
        let file = scratch.0.join("lb.toml");
        std::fs::write(&file, b"[daemon]\n").unwrap();
        let sig = sign(&ed, "ballast", &file);
        for (options, ok) in [
            ("namespaces=\"git,ballast\"", true),
            ("namespaces=\"git\"", false),
            ("valid-after=\"20000101\"", true),
            ("valid-before=\"20000101Z\"", false),
            ("valid-after=\"29991231235959\"", false),
        ] {
            let policy = policy(&scratch.0, &format!("ops {options} {ed_pub}\n"));
            let result = policy.check("lb.toml", b"[daemon]\n", Some(&sig));
            assert_eq!(result.is_ok(), ok, "{options}: {result:?}");
            if !ok {
                assert!(result.unwrap_err().to_string().contains("line 1 of"), "{options}");
            }
        }
        assert_eq!(parse_time("19700101000000Z"), Some(0));
        assert_eq!(parse_time("20240229"), Some(1_709_164_800));
        assert_eq!(parse_time("2024022"), None);
    }

    #[test]
    fn no_policy_requires_nothing_and_bad_policies_name_the_field_and_the_file() {
        let scratch = Scratch::new("sig-policy");
        let none = Policy::load(&scratch.0).unwrap();
        assert!(!none.required());
        assert_eq!(none.check("x", b"x", None).unwrap(), None);
        let not_required = Policy::parse(
            &scratch.0.join("policy.toml"),
            b"[signatures]\nrequired = false\nallowed_signers = \"/nonexistent\"\n",
        )
        .unwrap();
        assert!(!not_required.required());

        let path = scratch.0.join("policy.toml");
        for (text, field) in [
            (
                "[signatures]\nrequired = true\nallowed_signers = \"/nonexistent/allowed\"\n",
                "signatures.allowed_signers",
            ),
            ("[signatures]\nrequired = \"yes\"\nallowed_signers = \"/x\"\n", "signatures.required"),
            ("[signatures]\nrequired = true\nallowed_signer = \"/x\"\n", "signatures.allowed_signer"),
            ("[signature]\nrequired = true\n", "signature"),
            ("[signatures]\nrequired = true\nallowed_signers = \"/x\"\nnamespace = \"\"\n", "signatures.namespace"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Policy::load(&scratch.0).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, Error::Config(_)), "{message}");
            assert!(message.contains(&format!("{}: {field}", path.display())), "{text}: {message}");
        }
        std::fs::write(scratch.0.join("allowed_signers"), "ops ssh-ed25519 AAAAnotakey\n").unwrap();
        let text =
            format!("[signatures]\nrequired = true\nallowed_signers = \"{}/allowed_signers\"\n", scratch.0.display());
        std::fs::write(&path, text).unwrap();
        let message = Policy::load(&scratch.0).unwrap_err().to_string();
        assert!(message.contains("allowed_signers: line 1: the public key does not parse"), "{message}");
    }
}
