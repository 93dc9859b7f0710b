variable "region" {
  description = "AWS region (the same as the aws-batch stack)."
  type        = string
  default     = "us-east-1"
}

variable "project" {
  description = "Name prefix of the resources."
  type        = string
  default     = "sdpo"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "VPC to run in (output vpc_id of ../aws-batch)."
  type        = string
}

variable "private_subnet_ids" {
  description = "At least two private subnets in different AZs, for RDS and the Fargate tasks."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids needs at least two subnets (RDS subnet groups span two AZs)."
  }
}

variable "public_subnet_ids" {
  description = "Public subnets for the load balancer; only used when load_balancer_internal is false."
  type        = list(string)
  default     = []
}

variable "load_balancer_internal" {
  description = "Keep the MLflow load balancer inside the VPC (reach it through VPN or peering)."
  type        = bool
  default     = true
}

variable "allowed_cidr_blocks" {
  description = "CIDR blocks allowed to reach MLflow: the VPC CIDR (Batch tasks) and your VPN/office ranges."
  type        = list(string)
}

variable "certificate_arn" {
  description = "ACM certificate for an HTTPS listener; null serves plain HTTP on port 80 (internal use only)."
  type        = string
  default     = null
}

variable "hostnames" {
  description = "Extra DNS names clients use for the server (added to MLflow's allowed Host headers)."
  type        = list(string)
  default     = []
}

variable "artifact_bucket_name" {
  description = "Existing S3 bucket for artifacts (output artifacts_bucket_name of ../aws-batch)."
  type        = string
}

variable "artifact_prefix" {
  description = "Key prefix inside the bucket for MLflow artifacts."
  type        = string
  default     = "mlflow"
}

variable "mlflow_image" {
  description = "Image built from infra/docker/mlflow.Dockerfile, e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/sdpo/mlflow:3.17.2."
  type        = string
}

variable "workers" {
  description = "MLflow server worker processes per task (about 0.5 GiB of memory each)."
  type        = number
  default     = 2
}

variable "task_cpu" {
  description = "Fargate task CPU units (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "task_memory" {
  description = "Fargate task memory in MiB (must suit task_cpu)."
  type        = number
  default     = 2048
}

variable "desired_count" {
  description = "Number of MLflow server tasks behind the load balancer."
  type        = number
  default     = 1
}

variable "db_instance_class" {
  description = "RDS instance class of the PostgreSQL backend store."
  type        = string
  default     = "db.t4g.small"
}

variable "db_engine_version" {
  description = "PostgreSQL major version."
  type        = string
  default     = "16"
}

variable "db_allocated_storage" {
  description = "Initial RDS storage in GiB (grows automatically up to 5x)."
  type        = number
  default     = 20
}

variable "db_multi_az" {
  description = "Run a standby replica in a second AZ."
  type        = bool
  default     = false
}

variable "db_deletion_protection" {
  description = "Protect the database (runs, metrics, model registry) from deletion; set false to destroy the stack."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "CloudWatch retention of the server logs."
  type        = number
  default     = 30
}
