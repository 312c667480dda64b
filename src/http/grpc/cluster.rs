//! etcd's Cluster and Maintenance services: what reads the cluster's state (the member list, a
//! member's status, the alarms) is forwarded to etcd through the endpoint pool and answered with
//! etcd's response; what changes the cluster (members, alarms set or cleared, defragment, move
//! leader, downgrade) is refused with `PERMISSION_DENIED`: the sidecar would act with its own
//! etcd credentials on the app's word. A member's hashes and its backup stream are not served.

use std::sync::Arc;

use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbMaintenanceService, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbMoveLeaderRequest, PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse,
    PbStatusRequest, PbStatusResponse,
};
use etcd_client::{AlarmAction, AlarmType};
use tonic::{Request, Response, Status};

use super::forward;
use crate::http::state::AppState;
use crate::upstream::Retry;

/// etcd's Cluster and Maintenance services over the pool.
pub struct ClusterService {
    /// The pool and the settings.
    state: Arc<AppState>,
}

impl ClusterService {
    /// The services over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        ClusterService { state }
    }
}

/// The refusal of a call that would change the cluster.
fn refused(method: &str) -> Status {
    Status::permission_denied(format!(
        "{method} changes the etcd cluster; the sidecar does not forward it (it would act with \
         the sidecar's etcd credentials): ask etcd directly"
    ))
}

#[tonic::async_trait]
impl PbClusterService for ClusterService {
    async fn member_list(
        &self,
        _: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        // (etcd-client asks linearizably; a serializable list is the same list, a moment older.)
        let response = forward(&self.state, Retry::Read, |mut client| async move {
            client.member_list().await
        })
        .await?;
        Ok(Response::new(response.0))
    }

    async fn member_add(
        &self,
        _: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(refused("Cluster.MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(refused("Cluster.MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(refused("Cluster.MemberUpdate"))
    }

    async fn member_promote(
        &self,
        _: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(refused("Cluster.MemberPromote"))
    }
}

#[tonic::async_trait]
impl PbMaintenanceService for ClusterService {
    async fn status(
        &self,
        _: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let response = forward(&self.state, Retry::Read, |mut client| async move {
            client.status().await
        })
        .await?;
        Ok(Response::new(response.0))
    }

    /// Listing the alarms is forwarded; raising or clearing one is refused.
    async fn alarm(
        &self,
        request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        if request.get_ref().action != AlarmAction::Get as i32 {
            return Err(refused("Maintenance.Alarm (activate, deactivate)"));
        }
        let response = forward(&self.state, Retry::Read, |mut client| async move {
            client.alarm(AlarmAction::Get, AlarmType::None, None).await
        })
        .await?;
        Ok(Response::new(response.0))
    }

    async fn defragment(
        &self,
        _: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(refused("Maintenance.Defragment"))
    }

    async fn move_leader(
        &self,
        _: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(refused("Maintenance.MoveLeader"))
    }

    async fn downgrade(
        &self,
        _: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(refused("Maintenance.Downgrade"))
    }

    async fn hash(&self, _: Request<PbHashRequest>) -> Result<Response<PbHashResponse>, Status> {
        Err(per_member("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        _: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(per_member("Maintenance.HashKV"))
    }

    type SnapshotStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<PbSnapshotResponse, Status>> + Send>,
    >;

    async fn snapshot(
        &self,
        _: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(per_member("Maintenance.Snapshot"))
    }
}

/// The refusal of a call about one member's own data, which the sidecar cannot aim at a member.
fn per_member(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is about one member's data; the sidecar, which spreads calls over members, does \
         not serve it: ask the member"
    ))
}
