variable "region" {
  description = "AWS region for every resource (choose one with the GPU instance types you want)."
  type        = string
  default     = "us-east-1"
}

variable "project" {
  description = "Name prefix of the resources (letters, digits and dashes)."
  type        = string
  default     = "sdpo"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.project))
    error_message = "project must be 2-21 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC created for Metaflow, the Batch compute environment and MLflow."
  type        = string
  default     = "10.20.0.0/16"
}

variable "gpu_instance_types" {
  description = <<-EOT
    EC2 instance types of the AWS Batch GPU compute environment. AWS Batch picks its NVIDIA GPU AMI for GPU
    families. g5: A10G 24 GB (xlarge = 1 GPU, 12xlarge = 4, 48xlarge = 8); p4d.24xlarge: 8 x A100 40 GB;
    p5.48xlarge: 8 x H100. Check the region offers them and that the account has the vCPU quota.
  EOT
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g5.12xlarge", "g5.48xlarge", "p4d.24xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0 && alltrue([for t in var.gpu_instance_types : can(regex("^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\\.", t))])
    error_message = "gpu_instance_types must list GPU instance types (g4dn, g5, g6, g6e, p3, p4d, p4de, p5, p5e)."
  }
}

variable "max_vcpus" {
  description = "Upper bound of the Batch compute environment in vCPUs (96 = one p4d.24xlarge or two g5.12xlarge)."
  type        = number
  default     = 96

  validation {
    condition     = var.max_vcpus >= 4
    error_message = "max_vcpus must be at least 4 (the smallest GPU instance)."
  }
}

variable "min_vcpus" {
  description = "Lower bound in vCPUs; 0 scales the GPU fleet to zero when no job is queued."
  type        = number
  default     = 0
}

variable "enable_step_functions" {
  description = "Also provision AWS Step Functions so flows can be scheduled with `step-functions create`."
  type        = bool
  default     = false
}

variable "with_public_ip" {
  description = "Give the Metaflow metadata service a public IP (needed when it runs in public subnets)."
  type        = bool
  default     = false
}

variable "access_list_cidr_blocks" {
  description = "CIDR blocks (VPN, office) allowed to reach the Metaflow metadata service API."
  type        = list(string)
  default     = []
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete non-empty buckets (datastore, DVC remote, MLflow artifacts)."
  type        = bool
  default     = false
}
