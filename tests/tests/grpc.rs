//! Proves the agent speaks standard gRPC beyond its own service, as `grpcurl` and Kubernetes
//! probes expect: the `grpc.health.v1.Health` service reports SERVING for `soma.v1.SomaAgent`,
//! and server reflection (v1) lists the services, so `grpcurl -plaintext ADDR list` works without
//! a copy of the .proto files.

use soma_tests::{Agent, PgCluster, TestStore};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[test]
fn health_and_reflection_answer() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let endpoint = format!("http://{}", agent.addr());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest {
                service: "soma.v1.SomaAgent".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a service list, got {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["soma.v1.SomaAgent", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
    });
}
