//! PostgreSQL over TLS: `DATABASE_URL`'s `sslmode` and `sslrootcert` are honoured, the
//! server is verified against the CA named there, and a server that requires TLS is not
//! reached without it.

use crate::common::{tls, Postgres, TempDir};
use gateway::store;

#[tokio::test]
async fn the_gateway_reaches_postgres_over_tls_verified_against_the_named_ca() {
    let certs = TempDir::new("gwtest-pgtls");
    tls::certificates(certs.path());
    let other = TempDir::new("gwtest-pgtls-other");
    tls::certificates(other.path());
    let pg = Postgres::start_tls(certs.path());
    let url = |params: String| format!("{}/gateway?{params}", pg.url());
    let ca = |dir: &TempDir| dir.path().join("ca.pem").display().to_string();

    // Verified (the certificate is the CA's, for 127.0.0.1): the database is created,
    // migrated and used over TLS.
    let verified = url(format!("sslmode=verify-full&sslrootcert={}", ca(&certs)));
    let pool = store::connect(&verified, 2).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let (ssl, version): (bool, String) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ssl, "the connection is encrypted");
    assert!(version.starts_with("TLSv1."), "{version}");
    pool.close().await;

    // A certificate from another CA is refused, and so is a server's own when no CA
    // is named (the system's roots do not know it).
    for params in [
        format!("sslmode=verify-full&sslrootcert={}", ca(&other)),
        "sslmode=verify-full".to_owned(),
    ] {
        let e = store::connect(&url(params.clone()), 2).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.to_lowercase().contains("certificate"),
            "{params}: {text}"
        );
    }

    // Without TLS the server turns the connection away, and says why.
    let e = store::connect(&url("sslmode=disable".to_owned()), 2)
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("no encryption"), "{text}");
}
