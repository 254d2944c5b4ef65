//! Certificates for the TLS tests: a throwaway CA and what it signs, made with `openssl`.

/// Runs `openssl` with `args` in `dir`.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for this test (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`), and certificates it signed for a server at 127.0.0.1
/// (`server.pem`, `server.key`) and for a client (`client.pem`, `client.key`), in `dir`.
pub fn certificates(dir: &std::path::Path) {
    let run = |command: &str| openssl(dir, &command.split_whitespace().collect::<Vec<_>>());
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    run(&format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca"
    ));
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        run(&format!(
            "req {ec} -keyout {who}.key -out {who}.csr -subj /CN={who}"
        ));
        run(&format!(
            "x509 -req -in {who}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out {who}.pem -days 1 -extfile {who}.ext"
        ));
    }
}
