//! The claim store's booking mark against a real Redis: which tasks without
//! a claim count as scheduled.

use std::time::Duration;

use kairos_server::domain::TaskId;
use kairos_server::store::claims::{
    CancelClaim, Claims, DispatchClaim, StartClaim, StartRequest, claims_key,
};
use kairos_tests::procs::RedisServer;

const WIDTH_MS: i64 = 1_000;

fn start(bucket_ms: i64, id: &str) -> StartRequest<'_> {
    StartRequest {
        bucket_ms,
        id,
        attempt: 1,
        expire_at_ms: 0,
    }
}

/// An id timed at or after its hash's mark has no claim yet and counts as
/// scheduled; an older one (its claim lost with the hash) counts as missing,
/// for a start and for a release past its deadline alike. A cancel needs no
/// claim before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_covers_the_ids_booked_under_it_and_no_older_ones() {
    let redis = RedisServer::start();
    let claims = Claims::connect(&redis.url(), Duration::from_secs(60)).expect("claims");
    let bucket = kairos_server::domain::bucket_of(chrono::Utc::now().timestamp_millis(), WIDTH_MS);
    let at = claims
        .mark(&[bucket, bucket], WIDTH_MS)
        .await
        .expect("mark");
    let now = chrono::Utc::now().timestamp_millis();
    assert!((at - now).abs() < 5_000, "Redis's time, {at} against {now}");

    // The older id first: booked ids never go back in time in one process.
    let lost = TaskId::booked(at - 1).to_string();
    let booked = TaskId::booked(at).to_string();
    let cancelled = TaskId::booked(at).to_string();
    assert_eq!(
        claims
            .cancel(bucket, WIDTH_MS, cancelled.parse().expect("id"))
            .await
            .expect("cancel"),
        CancelClaim::Cancelled
    );
    // A report's id is not trusted: one that is no UUID goes to SQL and
    // does not fail the starts beside it.
    let answers = claims
        .start(
            WIDTH_MS,
            now,
            &[
                start(bucket, "not-a-task"),
                start(bucket, &booked),
                start(bucket, &lost),
                start(bucket, &cancelled),
            ],
            false,
        )
        .await
        .expect("start");
    assert_eq!(
        answers,
        [
            StartClaim::Missing,
            StartClaim::Run { marker: false },
            StartClaim::Missing,
            StartClaim::Cancelled
        ]
    );

    // Past their start deadline at release: the covered one expires, the
    // older one goes to SQL.
    let late = TaskId::booked(at).to_string();
    let answers = claims
        .dispatch(
            bucket,
            WIDTH_MS,
            now,
            &[
                (late.as_str(), now - 1),
                (lost.as_str(), now - 1),
                ("", now - 1),
            ],
            false,
        )
        .await
        .expect("dispatch");
    assert_eq!(
        answers,
        [
            DispatchClaim::Expired,
            DispatchClaim::Missing,
            DispatchClaim::Missing
        ]
    );
}

/// A mark already later than Redis's clock (a clock that went back) is what
/// the next booking's ids carry, so they are still covered by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_never_dates_its_ids_before_an_existing_mark() {
    let redis = RedisServer::start();
    let claims = Claims::connect(&redis.url(), Duration::from_secs(60)).expect("claims");
    let bucket = kairos_server::domain::bucket_of(chrono::Utc::now().timestamp_millis(), WIDTH_MS);
    let ahead = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let mut conn = redis.connect().await;
    let () = redis::cmd("HSET")
        .arg(claims_key(bucket))
        .arg("_")
        .arg(ahead)
        .query_async(&mut conn)
        .await
        .expect("hset");

    let at = claims.mark(&[bucket], WIDTH_MS).await.expect("mark");
    assert_eq!(at, ahead);
    let id = TaskId::booked(at).to_string();
    let answers = claims
        .start(
            WIDTH_MS,
            chrono::Utc::now().timestamp_millis(),
            &[start(bucket, &id)],
            false,
        )
        .await
        .expect("start");
    assert_eq!(answers, [StartClaim::Run { marker: false }]);
}
