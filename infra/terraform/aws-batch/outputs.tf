# Metaflow configuration values: write them with
#   terraform output -raw metaflow_profile_json > ~/.metaflow/config_sdpo.json && export METAFLOW_PROFILE=sdpo

output "metaflow_profile_json" {
  description = "Metaflow profile (JSON) for this stack; fill METAFLOW_SERVICE_AUTH_KEY as the module explains."
  value       = module.metaflow.metaflow_profile_json
}

output "METAFLOW_DATASTORE_SYSROOT_S3" {
  description = "S3 prefix of the Metaflow datastore."
  value       = module.metaflow.METAFLOW_DATASTORE_SYSROOT_S3
}

output "METAFLOW_DATATOOLS_S3ROOT" {
  description = "S3 prefix for metaflow.S3 data tools."
  value       = module.metaflow.METAFLOW_DATATOOLS_S3ROOT
}

output "METAFLOW_BATCH_JOB_QUEUE" {
  description = "ARN of the GPU AWS Batch job queue."
  value       = module.metaflow.METAFLOW_BATCH_JOB_QUEUE
}

output "METAFLOW_ECS_S3_ACCESS_IAM_ROLE" {
  description = "IAM role Batch tasks assume (datastore and artifacts bucket access)."
  value       = module.metaflow.METAFLOW_ECS_S3_ACCESS_IAM_ROLE
}

output "METAFLOW_SERVICE_URL" {
  description = "Metaflow metadata service URL."
  value       = module.metaflow.METAFLOW_SERVICE_URL
}

output "METAFLOW_SERVICE_INTERNAL_URL" {
  description = "Metaflow metadata service URL inside the VPC."
  value       = module.metaflow.METAFLOW_SERVICE_INTERNAL_URL
}

output "artifacts_bucket_name" {
  description = "Bucket of the DVC remote and MLflow artifacts (input artifact_bucket_name of ../mlflow)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "dvc_remote_url" {
  description = "URL for `dvc remote add -d storage URL`."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/dvc"
}

output "mlflow_artifacts_destination" {
  description = "Value for `mlflow server --artifacts-destination`."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/mlflow"
}

output "training_image_repository" {
  description = "ECR repository URL to push infra/docker/Dockerfile to (IMAGE in `--with batch:image=IMAGE`)."
  value       = aws_ecr_repository.train.repository_url
}

output "vpc_id" {
  description = "VPC of the stack (input vpc_id of ../mlflow)."
  value       = module.vpc.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets (input private_subnet_ids of ../mlflow)."
  value       = module.vpc.private_subnets
}

output "public_subnet_ids" {
  description = "Public subnets (input public_subnet_ids of ../mlflow when its load balancer is public)."
  value       = module.vpc.public_subnets
}

output "vpc_cidr_block" {
  description = "CIDR of the VPC (input allowed_cidr_blocks of ../mlflow so Batch tasks reach the server)."
  value       = module.vpc.vpc_cidr_block
}
