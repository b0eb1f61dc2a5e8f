//! Errors of the log layer, classified as retryable (transient) or not.

use std::path::PathBuf;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// An error of the event log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The topic does not exist (call [`super::EventLog::ensure_topic`] first).
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),

    /// The topic name breaks Kafka's naming rules.
    #[error("invalid topic name {0:?}: use 1-249 characters of [A-Za-z0-9._-]")]
    InvalidTopicName(String),

    /// The topic exists with another partition count than requested.
    #[error("topic {topic:?} has {actual} partitions, expected {expected}")]
    PartitionMismatch {
        /// Topic name.
        topic: String,
        /// Partitions requested.
        expected: i32,
        /// Partitions found.
        actual: i32,
    },

    /// A bad argument (partition out of range, negative offset, empty group, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Another process (or another handle in this process) holds the embedded log's directory.
    #[error(
        "embedded log at {path:?} is locked by another process (the embedded log is single-process; \
         stop the other syncbridge or configure Kafka): {detail}"
    )]
    Locked {
        /// The log directory.
        path: PathBuf,
        /// The underlying message.
        detail: String,
    },

    /// The embedded log already has an active consumer for this group.
    #[error("consumer group {0:?} already has an active consumer in this process")]
    GroupBusy(String),

    /// Stored data could not be decoded.
    #[error("corrupt log data: {0}")]
    Corrupt(String),

    /// The embedded store (sled) failed.
    #[error("embedded store error: {0}")]
    Storage(#[from] sled::Error),

    /// A data file of the embedded log failed.
    #[error("embedded log file {path:?}: {op}: {source}")]
    File {
        /// The file (or directory).
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Kafka (librdkafka) reported an error.
    #[error("kafka error: {0}")]
    Kafka(#[from] KafkaError),

    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),

    /// A background task or the client is gone.
    #[error("log closed: {0}")]
    Closed(String),
}

impl LogError {
    /// Whether retrying the same call later may succeed (network, broker failover, rebalance,
    /// timeouts). Configuration, naming and data errors are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Kafka(e) => kafka_retryable(e),
            Self::Storage(sled::Error::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ),
            Self::UnknownTopic(_)
            | Self::InvalidTopicName(_)
            | Self::PartitionMismatch { .. }
            | Self::InvalidArgument(_)
            | Self::Locked { .. }
            | Self::GroupBusy(_)
            | Self::Corrupt(_)
            | Self::Storage(_)
            | Self::File { .. }
            | Self::Closed(_) => false,
        }
    }
}

fn kafka_retryable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    if let KafkaError::Transaction(t) = e {
        return t.is_retriable();
    }
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::MessageTimedOut
                | C::OperationTimedOut
                | C::TimedOutQueue
                | C::QueueFull
                | C::WaitingForCoordinator
                | C::Retry
                | C::InProgress
                | C::PreviousInProgress
                | C::Resolve
                | C::RequestTimedOut
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::BrokerNotAvailable
                | C::ReplicaNotAvailable
                | C::NetworkException
                | C::CoordinatorLoadInProgress
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::RebalanceInProgress
                | C::IllegalGeneration
                | C::UnknownMemberId
                | C::FencedLeaderEpoch
                | C::UnknownLeaderEpoch
                | C::KafkaStorageError
                | C::ThrottlingQuotaExceeded
                | C::UnstableOffsetCommit
                | C::OffsetNotAvailable
                | C::AssignmentLost
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(LogError::Timeout("x".into()).is_retryable());
        assert!(
            LogError::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                .is_retryable()
        );
        assert!(
            !LogError::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
            ))
            .is_retryable()
        );
        assert!(!LogError::UnknownTopic("t".into()).is_retryable());
        assert!(!LogError::Corrupt("x".into()).is_retryable());
    }
}
