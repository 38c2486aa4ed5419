//! Reaching the Kubernetes API server.

/// A client from in-cluster credentials or `$KUBECONFIG`, with an error that
/// says where credentials were looked for.
pub async fn client() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes credentials (in-cluster or $KUBECONFIG): {e}"))
}
