//! Test harness: a private CA and certificates made with `openssl`.

use super::*;

/// Runs openssl in `dir`; panics with its stderr when it fails.
pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and certificates it signed for 127.0.0.1, made with openssl:
/// `ca.crt`, and `<name>.crt` / `<name>.key` for each name asked for.
pub(crate) struct Pki {
    pub dir: Scratch,
}

impl Pki {
    pub(crate) fn new(names: &[&str]) -> Pki {
        let dir = Scratch::new("pki");
        let d = &dir.0;
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
            ],
        );
        fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext");
        for name in names {
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    "ext.cnf",
                ],
            );
        }
        Pki { dir }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.path(file)
    }
}
