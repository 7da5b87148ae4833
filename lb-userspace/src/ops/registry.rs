//! OCI distribution: `ballast push`, `ballast pull` and the `oci://REF` artifacts `attach`,
//! `swap` and `run` take.
//!
//! An artifact is pushed as an OCI image manifest (OCI 1.0 style, which docker-registry 2.8
//! and every registry since store): its config is a small JSON summary of media type
//! [`CONFIG_MEDIA_TYPE`], its one layer the artifact file's bytes, of media type
//! [`LAYER_MEDIA_TYPE`]; `artifactType` and the manifest's annotations name the generation
//! ([`DIGEST_ANNOTATION`], [`SUMMARY_ANNOTATION`]). A signature `FILE.sig` is pushed beside it
//! under the tag `sha256-<manifest hex>.sig` (cosign's scheme: registries without the
//! referrers API serve it), as a manifest whose one layer is the sshsig, of media type
//! [`SIGNATURE_MEDIA_TYPE`].
//!
//! A pull checks every byte it is given: the manifest against the digest asked for (a pull by
//! tag resolves the tag once, to the manifest digest the registry sent, and names that digest
//! from then on), the layer against the manifest's descriptor, the artifact's own digest
//! against the annotation; a registry that serves other bytes is refused.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr,
};

use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    errors::{OciDistributionError, OciErrorCode},
    manifest::OciDescriptor,
    secrets::RegistryAuth,
    Client, Reference, RegistryOperation,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    bail,
    error::Context as _,
    files::{private_dir, read_regular, read_regular_if_exists, write_atomically},
    generation::{
        artifact::{Artifact, MAX_ARTIFACT_BYTES},
        digest::hex,
        signature::signature_path,
    },
    other,
    state::StateDir,
    Error,
};

/// The `artifactType` of a pushed generation.
pub const ARTIFACT_TYPE: &str = "application/vnd.ballast.generation.v1";
/// The config blob's media type: a JSON summary ([`Summary`]).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.ballast.generation.config.v1+json";
/// The layer's media type: the artifact file's bytes, as `ballast build` writes them.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.ballast.generation.v1";
/// The signature layer's media type: `FILE.sig` as `ssh-keygen -Y sign` writes it.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.ballast.signature.v1+sshsig";
/// The `artifactType` of a signature manifest.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.ballast.signature.v1";
/// The annotation holding the generation's digest (`sha256:...`, as `ballast inspect` shows).
pub const DIGEST_ANNOTATION: &str = "dev.ballast.generation.digest";
/// The annotation holding the summary (VIPs, backends).
pub const SUMMARY_ANNOTATION: &str = "dev.ballast.generation.summary";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The prefix of a registry reference where a generation file is taken.
pub const SCHEME: &str = "oci://";
/// Where pulled generations are kept in the state directory.
const PULLED_DIR: &str = "pulled";
/// The largest manifest read.
const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// The largest signature read.
const MAX_SIGNATURE_BYTES: usize = 1 << 20;

/// How to reach a registry: the flags of `push`, `pull`, and the commands taking `oci://`.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Plain HTTP (a registry without TLS).
    pub plain_http: bool,
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Basic auth; without it, `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`).
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The config blob: what `skopeo inspect` and a registry's UI show of a generation.
#[derive(Serialize)]
struct Summary {
    digest: String,
    vips: usize,
    backends: usize,
}

/// What `push` put where.
#[derive(Debug)]
pub struct Pushed {
    /// `REGISTRY/REPO@sha256:...`: the reference to pull and attach by.
    pub pinned: String,
    pub manifest_digest: String,
    pub generation_digest: String,
    /// The signature's tag, when `FILE.sig` was pushed.
    pub signature_tag: Option<String>,
}

/// What `pull` fetched and checked.
#[derive(Debug)]
pub struct Pulled {
    /// `REGISTRY/REPO@sha256:...` (never the tag).
    pub pinned: String,
    pub manifest_digest: String,
    pub generation_digest: String,
    /// The artifact file's bytes.
    pub artifact: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

/// `REF` of `oci://REF`, or None for a file path.
pub fn oci_reference(path: &Path) -> Option<&str> {
    path.to_str().and_then(|p| p.strip_prefix(SCHEME))
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn parse_reference(reference: &str) -> crate::Result<Reference> {
    let reference = reference.strip_prefix(SCHEME).unwrap_or(reference);
    Reference::from_str(reference).map_err(|e| {
        other!("{reference}: not a registry reference (REGISTRY/REPO[:TAG] or REGISTRY/REPO@sha256:...): {e}")
    })
}

/// Names what failed: unreachable, unauthorized, not found, or the registry's own words.
fn registry_error(reference: &str, step: &str, e: OciDistributionError) -> Error {
    let kind = match &e {
        OciDistributionError::RequestError(_) => "registry unreachable",
        OciDistributionError::DigestError(_) => "digest mismatch",
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            "unauthorized"
        }
        OciDistributionError::ServerError { code: 401 | 403, .. } => "unauthorized",
        OciDistributionError::ImageManifestNotFoundError(_) | OciDistributionError::ServerError { code: 404, .. } => {
            "not found"
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|c| matches!(c.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            "unauthorized"
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|c| {
                matches!(
                    c.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            "not found"
        }
        OciDistributionError::RegistryError { .. } => "refused by the registry",
        _ => "failed",
    };
    let mut cause = e.to_string().trim_end().to_owned();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !cause.contains(&text) {
            cause = format!("{cause}: {text}");
        }
        source = s.source();
    }
    other!("{reference}: {step}: {kind}: {cause}; nothing was changed")
}

/// `~/.docker/config.json`'s `auths` entry for `registry` (base64 `user:pass`), if any.
fn docker_config_auth(registry: &str) -> crate::Result<Option<(String, String)>> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME") {
            Some(home) => Path::new(&home).join(".docker"),
            None => return Ok(None),
        },
    };
    let path = dir.join("config.json");
    let Some(bytes) = read_regular_if_exists(&path, 1 << 20, "docker config")? else { return Ok(None) };
    auth_in_docker_config(&path, &bytes, registry)
}

/// The user and password of `registry` in the docker config `bytes` (read from `path`).
fn auth_in_docker_config(path: &Path, bytes: &[u8], registry: &str) -> crate::Result<Option<(String, String)>> {
    use base64::Engine as _;
    let config: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| other!("{}: not JSON: {e}", path.display()))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else { return Ok(None) };
    let entry = auths.iter().find(|(key, _)| {
        let key = key.trim_start_matches("https://").trim_start_matches("http://");
        key.split('/').next() == Some(registry)
    });
    let Some(encoded) = entry.and_then(|(_, v)| v.get("auth")).and_then(|a| a.as_str()) else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| other!("{}: auths.{registry}.auth: not base64: {e}", path.display()))?;
    let text =
        String::from_utf8(decoded).map_err(|_| other!("{}: auths.{registry}.auth: not UTF-8", path.display()))?;
    let (user, pass) =
        text.split_once(':').ok_or_else(|| other!("{}: auths.{registry}.auth: not user:password", path.display()))?;
    Ok(Some((user.to_owned(), pass.to_owned())))
}

struct Session {
    client: Client,
    auth: RegistryAuth,
    runtime: tokio::runtime::Runtime,
}

impl Session {
    fn new(reference: &Reference, options: &RegistryOptions) -> crate::Result<Session> {
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = &options.ca_file {
            let data = read_regular(ca, 1 << 20, "--ca-file")?;
            extra_root_certificates.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let protocol = if options.plain_http { ClientProtocol::Http } else { ClientProtocol::Https };
        let client = Client::new(ClientConfig { protocol, extra_root_certificates, ..ClientConfig::default() });
        let auth = match (&options.username, &options.password) {
            (Some(user), Some(pass)) => RegistryAuth::Basic(user.clone(), pass.clone()),
            (Some(user), None) => bail!("--username {user}: give the password on stdin (--password-stdin)"),
            (None, Some(_)) => bail!("--password-stdin: give --username too"),
            (None, None) => match docker_config_auth(reference.resolve_registry())? {
                Some((user, pass)) => RegistryAuth::Basic(user, pass),
                None => RegistryAuth::Anonymous,
            },
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the registry client's runtime")?;
        Ok(Session { client, auth, runtime })
    }

    fn blob(&self, reference: &Reference, data: &[u8], what: &str) -> crate::Result<String> {
        let digest = sha256_digest(data);
        self.runtime
            .block_on(self.client.push_blob(reference, data, &digest))
            .map_err(|e| registry_error(&reference.whole(), &format!("pushing the {what}"), e))?;
        Ok(digest)
    }

    fn manifest(&self, reference: &Reference, manifest: &serde_json::Value) -> crate::Result<String> {
        let body = serde_json::to_vec(manifest).context("rendering the manifest")?;
        let digest = sha256_digest(&body);
        let content_type = reqwest_header(MANIFEST_MEDIA_TYPE);
        self.runtime
            .block_on(self.client.push_manifest_raw(reference, body, content_type))
            .map_err(|e| registry_error(&reference.whole(), "pushing the manifest", e))?;
        Ok(digest)
    }

    /// The manifest `reference` names and its digest, checked against the digest asked for.
    fn pull_manifest(&self, reference: &Reference) -> crate::Result<(serde_json::Value, String)> {
        let whole = reference.whole();
        let (bytes, _) = self
            .runtime
            .block_on(self.client.pull_manifest_raw(reference, &self.auth, &[MANIFEST_MEDIA_TYPE]))
            .map_err(|e| registry_error(&whole, "pulling the manifest", e))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            bail!(
                "{whole}: the manifest is {} bytes, more than {MAX_MANIFEST_BYTES}; nothing was changed",
                bytes.len()
            );
        }
        let digest = sha256_digest(&bytes);
        if let Some(asked) = reference.digest() {
            if asked != digest {
                return Err(Error::DigestMismatch(format!(
                    "{whole}: the registry served a manifest of digest {digest}; nothing was changed"
                )));
            }
        }
        let manifest = serde_json::from_slice(&bytes).map_err(|e| other!("{whole}: the manifest is not JSON: {e}"))?;
        Ok((manifest, digest))
    }

    /// The one layer of `manifest` of media type `media_type`, checked against its descriptor.
    fn pull_layer(
        &self,
        reference: &Reference,
        manifest: &serde_json::Value,
        media_type: &str,
        cap: usize,
    ) -> crate::Result<Vec<u8>> {
        let whole = reference.whole();
        let layers: Vec<OciDescriptor> = serde_json::from_value(manifest.get("layers").cloned().unwrap_or_default())
            .map_err(|e| other!("{whole}: not a ballast artifact: the manifest's layers: {e}; nothing was changed"))?;
        let [layer] = layers.as_slice() else {
            bail!("{whole}: not a ballast artifact: {} layers, not one; nothing was changed", layers.len());
        };
        if layer.media_type != media_type {
            bail!(
                "{whole}: not a ballast artifact: the layer is a {}, not a {media_type}; nothing was changed",
                layer.media_type
            );
        }
        if layer.size < 0 || layer.size as usize > cap {
            bail!("{whole}: the layer is {} bytes, more than {cap}; nothing was changed", layer.size);
        }
        let mut data = Vec::new();
        self.runtime
            .block_on(self.client.pull_blob(reference, layer, &mut data))
            .map_err(|e| registry_error(&whole, &format!("pulling the layer {}", layer.digest), e))?;
        let got = sha256_digest(&data);
        if got != layer.digest || data.len() as i64 != layer.size {
            return Err(Error::DigestMismatch(format!(
                "{whole}: the registry served {} bytes of digest {got} for the layer {} ({} bytes); nothing was changed",
                data.len(),
                layer.digest,
                layer.size
            )));
        }
        Ok(data)
    }
}

fn reqwest_header(value: &'static str) -> http::HeaderValue {
    http::HeaderValue::from_static(value)
}

fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replace(':', "-"))
}

fn descriptor(media_type: &str, data: &[u8], digest: String) -> serde_json::Value {
    serde_json::json!({ "mediaType": media_type, "digest": digest, "size": data.len() })
}

/// Pushes the artifact `file` (and `FILE.sig`, if there is one) to `reference`.
pub fn push(file: &Path, reference: &str, options: &RegistryOptions) -> crate::Result<Pushed> {
    let target = parse_reference(reference)?;
    let bytes = read_regular(file, MAX_ARTIFACT_BYTES, "artifact")?;
    let artifact = Artifact::from_bytes(&bytes).map_err(|e| e.context(format!("{}", file.display())))?;
    let signature = read_regular_if_exists(&signature_path(file), MAX_SIGNATURE_BYTES as u64, "signature")?;
    let session = Session::new(&target, options)?;
    let whole = target.whole();
    session
        .runtime
        .block_on(session.client.auth(&target, &session.auth, RegistryOperation::Push))
        .map_err(|e| registry_error(&whole, "authenticating", e))?;
    let generation_digest = artifact.digest_string();
    let summary = Summary {
        digest: generation_digest.clone(),
        vips: artifact.generation.vip_count(),
        backends: artifact.generation.backends.len(),
    };
    let config = serde_json::to_vec(&summary).context("rendering the summary")?;
    let config_digest = session.blob(&target, &config, "config")?;
    let layer_digest = session.blob(&target, &bytes, "artifact")?;
    let title = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let annotations = BTreeMap::from([
        (DIGEST_ANNOTATION.to_owned(), generation_digest.clone()),
        (SUMMARY_ANNOTATION.to_owned(), format!("{} VIPs, {} backends", summary.vips, summary.backends)),
        ("org.opencontainers.image.title".to_owned(), title),
    ]);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config, config_digest),
        "layers": [descriptor(LAYER_MEDIA_TYPE, &bytes, layer_digest)],
        "annotations": annotations,
    });
    let manifest_digest = session.manifest(&target, &manifest)?;
    let pinned =
        Reference::with_digest(target.registry().to_owned(), target.repository().to_owned(), manifest_digest.clone());
    let signature_tag = match signature {
        None => None,
        Some(signature) => {
            let tag = signature_tag(&manifest_digest);
            let at = Reference::with_tag(target.registry().to_owned(), target.repository().to_owned(), tag.clone());
            let empty = b"{}";
            let config_digest = session.blob(&at, empty, "signature's config")?;
            let layer_digest = session.blob(&at, &signature, "signature")?;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "artifactType": SIGNATURE_ARTIFACT_TYPE,
                "config": descriptor("application/vnd.oci.empty.v1+json", empty, config_digest),
                "layers": [descriptor(SIGNATURE_MEDIA_TYPE, &signature, layer_digest)],
                "subject": { "mediaType": MANIFEST_MEDIA_TYPE, "digest": manifest_digest, "size": serde_json::to_vec(&manifest).map(|m| m.len()).unwrap_or(0) },
            });
            session.manifest(&at, &manifest)?;
            Some(tag)
        }
    };
    Ok(Pushed { pinned: pinned.whole(), manifest_digest, generation_digest, signature_tag })
}

/// Pulls `reference` (by tag: resolved once; by digest: checked), with its signature if one
/// was pushed: every byte checked, the artifact parsed, its digest equal to the annotation.
pub fn pull(reference: &str, options: &RegistryOptions) -> crate::Result<Pulled> {
    let asked = parse_reference(reference)?;
    let session = Session::new(&asked, options)?;
    let (manifest, manifest_digest) = session.pull_manifest(&asked)?;
    let pinned =
        Reference::with_digest(asked.registry().to_owned(), asked.repository().to_owned(), manifest_digest.clone());
    let whole = pinned.whole();
    let config_type = manifest.pointer("/config/mediaType").and_then(|t| t.as_str()).unwrap_or("");
    if config_type != CONFIG_MEDIA_TYPE {
        bail!("{whole}: not a ballast artifact: its config is a '{config_type}', not a {CONFIG_MEDIA_TYPE}; nothing was changed");
    }
    let annotated = manifest.pointer(&format!("/annotations/{DIGEST_ANNOTATION}")).and_then(|d| d.as_str());
    let Some(annotated) = annotated.map(str::to_owned) else {
        bail!("{whole}: not a ballast artifact: no {DIGEST_ANNOTATION} annotation; nothing was changed");
    };
    let artifact = session.pull_layer(&pinned, &manifest, LAYER_MEDIA_TYPE, MAX_ARTIFACT_BYTES as usize)?;
    let parsed = Artifact::from_bytes(&artifact).map_err(|e| e.context(format!("{whole}: the layer")))?;
    let generation_digest = parsed.digest_string();
    if generation_digest != annotated {
        return Err(Error::DigestMismatch(format!(
            "{whole}: the artifact is generation {generation_digest}, the manifest says {annotated}; nothing was changed"
        )));
    }
    let signed_at = Reference::with_tag(
        asked.registry().to_owned(),
        asked.repository().to_owned(),
        signature_tag(&manifest_digest),
    );
    let signature = match session.pull_manifest(&signed_at) {
        Ok((manifest, _)) => {
            Some(session.pull_layer(&signed_at, &manifest, SIGNATURE_MEDIA_TYPE, MAX_SIGNATURE_BYTES)?)
        }
        Err(e) if e.to_string().contains(": not found: ") => None,
        Err(e) => return Err(e),
    };
    Ok(Pulled { pinned: whole, manifest_digest, generation_digest, artifact, signature })
}

/// Writes what `pull` fetched to `file` (and `FILE.sig`); a stale `FILE.sig` goes.
pub fn write_pulled(pulled: &Pulled, file: &Path) -> crate::Result<()> {
    let sig = signature_path(file);
    match &pulled.signature {
        Some(signature) => write_atomically(&sig, signature)?,
        None => match std::fs::remove_file(&sig) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context(format!("removing the stale {}", sig.display()))
            }
            _ => {}
        },
    }
    write_atomically(file, &pulled.artifact)
}

/// `oci://REF` pulled into the state directory (`pulled/<manifest hex>.bgen`, with `.sig`):
/// the path to read it from as a file, and the reference by digest to record.
pub fn pull_into_state(
    state: &StateDir,
    reference: &str,
    options: &RegistryOptions,
) -> crate::Result<(PathBuf, String)> {
    let pulled = pull(reference, options)?;
    let dir = state.root().join(PULLED_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    private_dir(&dir)?;
    let hex = pulled.manifest_digest.trim_start_matches("sha256:");
    let file = dir.join(format!("{hex}.bgen"));
    write_pulled(&pulled, &file)?;
    Ok((file, format!("{SCHEME}{}", pulled.pinned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(oci_reference(Path::new("oci://r:5000/a/b:t")), Some("r:5000/a/b:t"));
        assert_eq!(oci_reference(Path::new("gen.bgen")), None);
        let r = parse_reference("oci://127.0.0.1:5000/lb/web:v1").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("127.0.0.1:5000", "lb/web", Some("v1")));
        assert!(parse_reference("127.0.0.1:5000/UPPER:v1").is_err());
        assert_eq!(signature_tag("sha256:abcd"), "sha256-abcd.sig");
    }

    #[test]
    fn docker_config_auths() {
        let path = Path::new("config.json");
        // base64("ci:s3cr:et"): the password may hold a colon.
        let config = br#"{"auths": {"https://reg.example:5000/v1/": {"auth": "Y2k6czNjcjpldA=="}, "other": {}}}"#;
        let found = auth_in_docker_config(path, config, "reg.example:5000").unwrap();
        assert_eq!(found, Some(("ci".to_owned(), "s3cr:et".to_owned())));
        assert_eq!(auth_in_docker_config(path, config, "reg.example").unwrap(), None);
        assert_eq!(auth_in_docker_config(path, config, "other").unwrap(), None);
        let bad = br#"{"auths": {"r": {"auth": "!!"}}}"#;
        let error = auth_in_docker_config(path, bad, "r").unwrap_err().to_string();
        assert!(error.contains("config.json: auths.r.auth: not base64"), "{error}");
        assert!(auth_in_docker_config(path, b"{", "r").unwrap_err().to_string().contains("config.json: not JSON"));
    }
}
