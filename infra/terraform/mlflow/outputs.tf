output "tracking_uri" {
  description = "Set MLFLOW_TRACKING_URI to this value (clients and Metaflow tasks)."
  value       = "${local.https ? "https" : "http"}://${aws_lb.mlflow.dns_name}"
}

output "load_balancer_dns_name" {
  description = "DNS name of the load balancer (point a friendly CNAME here and add it to var.hostnames)."
  value       = aws_lb.mlflow.dns_name
}

output "artifacts_destination" {
  description = "Where the server stores artifacts."
  value       = local.artifacts_destination
}

output "db_endpoint" {
  description = "Address of the PostgreSQL backend store (reachable from the MLflow tasks only)."
  value       = aws_db_instance.mlflow.address
}

output "backend_store_uri_secret_arn" {
  description = "Secrets Manager secret holding MLFLOW_BACKEND_STORE_URI (for `mlflow db upgrade` runs)."
  value       = aws_secretsmanager_secret.backend_store_uri.arn
}

output "ecs_cluster_name" {
  description = "ECS cluster of the MLflow service."
  value       = aws_ecs_cluster.mlflow.name
}

output "ecs_service_name" {
  description = "ECS service running the MLflow server."
  value       = aws_ecs_service.mlflow.name
}

output "server_security_group_id" {
  description = "Security group of the MLflow tasks."
  value       = aws_security_group.server.id
}
