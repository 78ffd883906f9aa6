//! Replicas and pilot leases (`replicas`, `pilot_leases`): which running `ccmail run` may poll
//! which pilot.
//!
//! Invariants, each enforced by the statement itself:
//! - at most one holder per pilot whose lease has not expired: a lease changes hands only when
//!   it has expired (or was released, which expires it at once);
//! - `fence` rises on every change of holder, never on a renewal, so a holder names its lease
//!   by (holder, fence) and a stale holder's renewal, release or fence check matches no row;
//! - [`check_fence`] locks the lease row `for share` inside the caller's transaction, so a
//!   takeover waits until that transaction ends: a batch either commits under a live lease or
//!   fails with [`StoreError::Fenced`] before anything is stored (and so before any DELE);
//! - times are the database's, so replicas with skewed clocks agree on expiry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::error::StoreError;

/// A lease as its holder knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Lease {
    pub pilot_id: i64,
    pub fence: i64,
    pub expires_at: DateTime<Utc>,
}

/// A lease as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub pilot_id: i64,
    pub holder: String,
    pub fence: i64,
    pub expires_at: DateTime<Utc>,
    /// The lease has not expired.
    pub live: bool,
}

/// What a replica says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo<'a> {
    pub id: &'a str,
    pub hostname: &'a str,
    pub pid: i32,
    pub version: &'a str,
}

/// Announces replica `me` (or renews its heartbeat).
pub async fn heartbeat_replica(
    conn: &mut PgConnection,
    me: &ReplicaInfo<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into replicas (id, hostname, pid, version) values ($1, $2, $3, $4) \
         on conflict (id) do update set heartbeat_at = now(), hostname = excluded.hostname, \
             pid = excluded.pid, version = excluded.version",
    )
    .bind(me.id)
    .bind(me.hostname)
    .bind(me.pid)
    .bind(me.version)
    .execute(conn)
    .await?;
    Ok(())
}

/// The replicas whose heartbeat is younger than `ttl`, ordered by id; stale rows older than
/// ten times `ttl` are removed on the way.
pub async fn live_replicas(
    conn: &mut PgConnection,
    ttl: Duration,
) -> Result<Vec<String>, StoreError> {
    sqlx::query("delete from replicas where heartbeat_at < now() - make_interval(secs => $1) * 10")
        .bind(ttl.as_secs_f64())
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar(
        "select id from replicas where heartbeat_at > now() - make_interval(secs => $1) \
         order by id",
    )
    .bind(ttl.as_secs_f64())
    .fetch_all(conn)
    .await?)
}

/// Replica `me` leaves: its row goes, so the others stop counting it at once.
pub async fn remove_replica(conn: &mut PgConnection, me: &str) -> Result<(), StoreError> {
    sqlx::query("delete from replicas where id = $1")
        .bind(me)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes (or keeps) the lease of `pilot` for `holder` until `ttl` from now: succeeds when
/// nobody holds it, when `holder` already does, or when the current lease has expired. The
/// fence rises unless `holder` keeps a live lease of its own: a lease taken again after it
/// expired or was released is a new lease, so whatever still acts on the old one is fenced out.
pub async fn acquire_lease(
    conn: &mut PgConnection,
    pilot: i64,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    Ok(acquire_leases(conn, &[pilot], holder, ttl).await?.pop())
}

/// [`acquire_lease`] for many pilots in one statement: the leases taken (or kept), in no
/// particular order; the pilots another holder keeps are not among them.
pub async fn acquire_leases(
    conn: &mut PgConnection,
    pilots: &[i64],
    holder: &str,
    ttl: Duration,
) -> Result<Vec<Lease>, StoreError> {
    if pilots.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "insert into pilot_leases (pilot_id, holder, fence, expires_at) \
         select p, $2, 1, now() + make_interval(secs => $3) from unnest($1::bigint[]) as p \
         on conflict (pilot_id) do update set \
             fence = case when pilot_leases.holder = excluded.holder \
                 and pilot_leases.expires_at > now() then pilot_leases.fence \
                 else pilot_leases.fence + 1 end, \
             acquired_at = case when pilot_leases.holder = excluded.holder \
                 and pilot_leases.expires_at > now() then pilot_leases.acquired_at else now() end, \
             holder = excluded.holder, renewed_at = now(), expires_at = excluded.expires_at \
         where pilot_leases.holder = excluded.holder or pilot_leases.expires_at <= now() \
         returning pilot_id, fence, expires_at",
    )
    .bind(pilots)
    .bind(holder)
    .bind(ttl.as_secs_f64())
    .fetch_all(conn)
    .await?)
}

/// [`renew_lease`] for many leases of `holder` in one statement: the leases renewed. A lease
/// missing from the answer is no longer `holder`'s: its poller must stop.
pub async fn renew_leases(
    conn: &mut PgConnection,
    leases: &[Lease],
    holder: &str,
    ttl: Duration,
) -> Result<Vec<Lease>, StoreError> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let pilots: Vec<i64> = leases.iter().map(|l| l.pilot_id).collect();
    let fences: Vec<i64> = leases.iter().map(|l| l.fence).collect();
    Ok(sqlx::query_as(
        "update pilot_leases l set expires_at = now() + make_interval(secs => $4), \
             renewed_at = now() \
         from unnest($1::bigint[], $2::bigint[]) as mine (pilot_id, fence) \
         where l.pilot_id = mine.pilot_id and l.fence = mine.fence and l.holder = $3 \
             and l.expires_at > now() \
         returning l.pilot_id, l.fence, l.expires_at",
    )
    .bind(&pilots)
    .bind(&fences)
    .bind(holder)
    .bind(ttl.as_secs_f64())
    .fetch_all(conn)
    .await?)
}

/// Gives up every live lease of `holder` at once (a replica shutting down): the number
/// released.
pub async fn release_all(conn: &mut PgConnection, holder: &str) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "update pilot_leases set expires_at = now() where holder = $1 and expires_at > now()",
    )
    .bind(holder)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Extends `lease` by `ttl` from now; `None` when it is no longer `holder`'s (expired, taken
/// over): the holder must stop polling the pilot.
pub async fn renew_lease(
    conn: &mut PgConnection,
    lease: &Lease,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    Ok(renew_leases(conn, std::slice::from_ref(lease), holder, ttl)
        .await?
        .pop())
}

/// Gives `lease` up at once (expires it), so another replica can take the pilot without
/// waiting for the TTL; false when it was no longer `holder`'s.
pub async fn release_lease(
    conn: &mut PgConnection,
    lease: &Lease,
    holder: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "update pilot_leases set expires_at = now() \
         where pilot_id = $1 and holder = $2 and fence = $3 and expires_at > now()",
    )
    .bind(lease.pilot_id)
    .bind(holder)
    .bind(lease.fence)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inside the caller's transaction: `Ok` when `lease` is still `holder`'s and live, with the
/// lease row locked until the transaction ends (a takeover waits for it); else
/// [`StoreError::Fenced`].
pub async fn check_fence(
    conn: &mut PgConnection,
    lease: &Lease,
    holder: &str,
) -> Result<(), StoreError> {
    let held: Option<i32> = sqlx::query_scalar(
        "select 1 from pilot_leases \
         where pilot_id = $1 and holder = $2 and fence = $3 and expires_at > now() for share",
    )
    .bind(lease.pilot_id)
    .bind(holder)
    .bind(lease.fence)
    .fetch_optional(conn)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced {
            pilot: lease.pilot_id,
        }),
    }
}

/// Enabled pilots that no replica holds a live lease of: nobody polls them.
pub async fn unheld_pilots(conn: &mut PgConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "select count(*) from pilots p where p.enabled and not exists \
             (select 1 from pilot_leases l where l.pilot_id = p.id and l.expires_at > now())",
    )
    .fetch_one(conn)
    .await?)
}

/// Every lease, by pilot.
pub async fn lease_holders(conn: &mut PgConnection) -> Result<Vec<LeaseHolder>, StoreError> {
    let rows: Vec<(i64, String, i64, DateTime<Utc>, bool)> = sqlx::query_as(
        "select pilot_id, holder, fence, expires_at, expires_at > now() from pilot_leases \
         order by pilot_id",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(pilot_id, holder, fence, expires_at, live)| LeaseHolder {
            pilot_id,
            holder,
            fence,
            expires_at,
            live,
        })
        .collect())
}
