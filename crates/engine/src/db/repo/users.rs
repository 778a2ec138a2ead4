//! Users with argon2 password hashes, and SSO bearer tokens stored as SHA-256 digests.
//!
//! Hashing runs on the blocking pool before any connection is taken (it costs tens of
//! milliseconds and ~19 MiB by design), so it never holds the SQLite writer.

use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;

use crate::db::list::{order_and_page, ListQuery, TextMatch, Where};
use crate::db::sql::{b2i, Arg, RowExt, Sql};
use crate::db::{Conn, Db, DbError};
use crate::model::*;
use crate::time::Timestamp;

/// The built-in administrator's domain.
pub const INTERNAL_DOMAIN: &str = "internal";
pub const ADMIN_NAME: &str = "admin";

const USER_COLS: &str = "id, name, domain, email, is_admin, created_at";

fn user_from_row(r: &AnyRow) -> Result<User, DbError> {
    Ok(User {
        id: r.parse("id")?,
        name: r.text("name")?,
        domain: r.text("domain")?,
        email: r.opt_text("email")?,
        admin: r.flag("is_admin")?,
        created_at: r.ts("created_at")?,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFilter {
    pub name: Option<TextMatch>,
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSort {
    Name,
    CreatedAt,
}

/// The result of [`Db::ensure_admin`].
#[derive(Debug, Clone)]
pub struct AdminBootstrap {
    pub user: User,
    /// Whether this call created the user.
    pub created: bool,
    /// The password chosen here when none was given: show it once, it is stored only hashed.
    pub generated_password: Option<String>,
}

/// A bearer token as handed to a client: only the client ever holds `token`.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: Timestamp,
}

/// What a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: User,
    pub expires_at: Timestamp,
}

/// Splits `name@domain`; a bare name is in the internal domain.
fn split_principal(principal: &str) -> (&str, &str) {
    match principal.rsplit_once('@') {
        Some((n, d)) => (n, d),
        None => (principal, INTERNAL_DOMAIN),
    }
}

fn check_password(pw: &str) -> Result<(), DbError> {
    if pw.is_empty() || pw.len() > 1024 {
        return Err(DbError::Invalid {
            what: "password",
            detail: "must be 1-1024 bytes".into(),
        });
    }
    Ok(())
}

async fn hash_password(pw: &str) -> Result<String, DbError> {
    check_password(pw)?;
    let pw = pw.to_string();
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| DbError::Password(e.to_string()))?;
        Argon2::default()
            .hash_password(pw.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| DbError::Password(e.to_string()))
    })
    .await
    .map_err(|e| DbError::Password(e.to_string()))?
}

/// A hash of a password nobody knows, so that unknown users cost as much as known ones.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$b3h2aXJ0LWRlY295LXNhbHQ$5QVtqXb1Dz9E8mKzLkH0Zb0rT0S9Jm6v1m3yCkB1y3w";

async fn verify_password(pw: &str, hash: Option<String>) -> bool {
    let pw = pw.to_string();
    let known = hash.is_some();
    let hash = hash.unwrap_or_else(|| DECOY_HASH.to_string());
    let ok = tokio::task::spawn_blocking(move || match PasswordHash::new(&hash) {
        Ok(h) => Argon2::default().verify_password(pw.as_bytes(), &h).is_ok(),
        Err(_) => false,
    })
    .await
    .unwrap_or(false);
    ok && known
}

fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn user_insert_row(
    c: &mut Conn<'_>,
    name: &str,
    domain: &str,
    hash: Option<String>,
    admin: bool,
) -> Result<User, DbError> {
    if name.is_empty() || domain.is_empty() || name.contains('@') {
        return Err(DbError::Invalid {
            what: "user name",
            detail: format!("{name:?}@{domain:?} is not name@domain"),
        });
    }
    let id = UserId::new_random();
    let mut q =
        Sql::new("INSERT INTO users (id, name, domain, password_hash, email, is_admin, created_at) VALUES (");
    q.arg(id.to_string())
        .push(", ")
        .arg(name)
        .push(", ")
        .arg(domain)
        .push(", ")
        .arg(Arg::Text(hash))
        .push(", NULL, ")
        .arg(b2i(admin))
        .push(", ")
        .arg(c.now.as_millis())
        .push(")");
    c.exec_as(&q, "user", format!("{name}@{domain}")).await?;
    user_get(c, id)
        .await?
        .ok_or_else(|| DbError::not_found("user", id))
}

async fn user_get(c: &mut Conn<'_>, id: UserId) -> Result<Option<User>, DbError> {
    let mut q = Sql::new(&format!("SELECT {USER_COLS} FROM users WHERE id = "));
    q.arg(id.to_string());
    c.opt(&q).await?.as_ref().map(user_from_row).transpose()
}

async fn user_get_by_principal(c: &mut Conn<'_>, principal: &str) -> Result<Option<User>, DbError> {
    let (name, domain) = split_principal(principal);
    let mut q = Sql::new(&format!("SELECT {USER_COLS} FROM users WHERE name = "));
    q.arg(name).push(" AND domain = ").arg(domain);
    c.opt(&q).await?.as_ref().map(user_from_row).transpose()
}

async fn user_list(c: &mut Conn<'_>, lq: &ListQuery<UserFilter, UserSort>) -> Result<Vec<User>, DbError> {
    let mut q = Sql::new(&format!("SELECT {USER_COLS} FROM users"));
    Where::new(&mut q, c.backend).each(lq, |w, f| {
        w.text("name", &f.name);
        w.eq("domain", &f.domain);
    });
    order_and_page(
        &mut q,
        lq,
        |k| match k {
            UserSort::Name => "name",
            UserSort::CreatedAt => "created_at",
        },
        "id",
    );
    c.all(&q).await?.iter().map(user_from_row).collect()
}

async fn user_delete(c: &mut Conn<'_>, id: UserId) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM users WHERE id = ");
    q.arg(id.to_string());
    Ok(c.exec(&q).await? == 1)
}

async fn token_validate(c: &mut Conn<'_>, token: &str) -> Result<Option<TokenInfo>, DbError> {
    let mut q = Sql::new(
        "SELECT u.id, u.name, u.domain, u.email, u.is_admin, u.created_at, t.expires_at \
         FROM sso_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ",
    );
    q.arg(token_hash(token))
        .push(" AND t.expires_at > ")
        .arg(c.now.as_millis());
    match c.opt(&q).await? {
        None => Ok(None),
        Some(r) => Ok(Some(TokenInfo {
            user: user_from_row(&r)?,
            expires_at: r.ts("expires_at")?,
        })),
    }
}

async fn token_revoke(c: &mut Conn<'_>, token: &str) -> Result<bool, DbError> {
    let mut q = Sql::new("DELETE FROM sso_tokens WHERE token_hash = ");
    q.arg(token_hash(token));
    Ok(c.exec(&q).await? == 1)
}

async fn tokens_purge_expired(c: &mut Conn<'_>) -> Result<u64, DbError> {
    let mut q = Sql::new("DELETE FROM sso_tokens WHERE expires_at <= ");
    q.arg(c.now.as_millis());
    c.exec(&q).await
}

async fn token_insert(c: &mut Conn<'_>, user: UserId, hash: &str, expires: Timestamp) -> Result<(), DbError> {
    let mut q = Sql::new("INSERT INTO sso_tokens (token_hash, user_id, created_at, expires_at) VALUES (");
    q.arg(hash)
        .push(", ")
        .arg(user.to_string())
        .push(", ")
        .arg(c.now.as_millis())
        .push(", ")
        .arg(expires.as_millis())
        .push(")");
    c.exec_as(&q, "token", format!("for user {user}")).await?;
    Ok(())
}

repo! {
    read user_get(id: UserId) -> Option<User> = user_get;
    /// `name@domain` (a bare name is `@internal`).
    read user_get_by_principal(principal: &str) -> Option<User> = user_get_by_principal;
    read user_list(q: &ListQuery<UserFilter, UserSort>) -> Vec<User> = user_list;
    /// Deletes the user and its tokens; returns whether it existed.
    write user_delete(id: UserId) -> bool = user_delete;
    /// The user a bearer token stands for, if it exists and has not expired.
    read token_validate(token: &str) -> Option<TokenInfo> = token_validate;
    /// Logs a token out; returns whether it existed.
    write token_revoke(token: &str) -> bool = token_revoke;
    write tokens_purge_expired() -> u64 = tokens_purge_expired;
}

impl Db {
    /// Creates a user with an argon2 hash of `password` (`None`: cannot log in with one).
    pub async fn user_create(
        &self,
        name: &str,
        domain: &str,
        password: Option<&str>,
        admin: bool,
    ) -> Result<User, DbError> {
        let hash = match password {
            Some(p) => Some(hash_password(p).await?),
            None => None,
        };
        let mut tx = self.begin().await?;
        let u = user_insert_row(&mut tx.ctx(), name, domain, hash, admin).await?;
        tx.commit().await?;
        Ok(u)
    }

    pub async fn user_set_password(&self, id: UserId, password: &str) -> Result<(), DbError> {
        let hash = hash_password(password).await?;
        let mut tx = self.begin().await?;
        let mut q = Sql::new("UPDATE users SET password_hash = ");
        q.arg(hash).push(" WHERE id = ").arg(id.to_string());
        if tx.ctx().exec(&q).await? == 0 {
            return Err(DbError::not_found("user", id));
        }
        tx.commit().await
    }

    /// The user if `password` is theirs. Unknown users and wrong passwords take the same time
    /// and give the same answer.
    pub async fn user_verify_password(
        &self,
        principal: &str,
        password: &str,
    ) -> Result<Option<User>, DbError> {
        let (name, domain) = split_principal(principal);
        let mut q = Sql::new(&format!(
            "SELECT {USER_COLS}, password_hash FROM users WHERE name = "
        ));
        q.arg(name).push(" AND domain = ").arg(domain);
        let row = {
            let mut c = self.read_conn().await?;
            self.ctx(&mut c).opt(&q).await?
        };
        let (user, hash) = match &row {
            Some(r) => (Some(user_from_row(r)?), r.opt_text("password_hash")?),
            None => (None, None),
        };
        let ok = verify_password(password, hash).await;
        Ok(if ok { user } else { None })
    }

    /// Makes sure `admin@internal` exists. With `password`, that becomes its password; a new
    /// admin without one gets a generated password, returned once.
    pub async fn ensure_admin(&self, password: Option<&str>) -> Result<AdminBootstrap, DbError> {
        let principal = format!("{ADMIN_NAME}@{INTERNAL_DOMAIN}");
        if let Some(user) = self.user_get_by_principal(&principal).await? {
            if let Some(p) = password {
                self.user_set_password(user.id, p).await?;
            }
            return Ok(AdminBootstrap {
                user,
                created: false,
                generated_password: None,
            });
        }
        let generated = match password {
            Some(_) => None,
            None => {
                let mut b = [0u8; 18];
                rand::thread_rng().fill_bytes(&mut b);
                Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
            }
        };
        let pw = password.map(str::to_string).or_else(|| generated.clone());
        match self
            .user_create(ADMIN_NAME, INTERNAL_DOMAIN, pw.as_deref(), true)
            .await
        {
            Ok(user) => Ok(AdminBootstrap {
                user,
                created: true,
                generated_password: generated,
            }),
            // Another engine created it at the same moment: theirs stands.
            Err(e) if e.is_already_exists() => {
                let user = self
                    .user_get_by_principal(&principal)
                    .await?
                    .ok_or_else(|| DbError::not_found("user", &principal))?;
                Ok(AdminBootstrap {
                    user,
                    created: false,
                    generated_password: None,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Issues a bearer token for `user` valid for `ttl`.
    pub async fn token_issue(&self, user: UserId, ttl: Duration) -> Result<IssuedToken, DbError> {
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let expires_at = self.now().saturating_add(ttl);
        let mut tx = self.begin().await?;
        token_insert(&mut tx.ctx(), user, &token_hash(&token), expires_at).await?;
        tx.commit().await?;
        Ok(IssuedToken { token, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoy_hash_is_a_valid_argon2_hash() {
        let h = PasswordHash::new(DECOY_HASH).expect("decoy parses");
        assert!(Argon2::default().verify_password(b"anything", &h).is_err());
    }

    #[test]
    fn principals_default_to_the_internal_domain() {
        assert_eq!(split_principal("admin@internal"), ("admin", "internal"));
        assert_eq!(split_principal("admin"), ("admin", "internal"));
        assert_eq!(split_principal("a@b@corp"), ("a@b", "corp"));
    }

    #[test]
    fn tokens_are_stored_as_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
