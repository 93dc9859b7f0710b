# Metaflow on AWS with a GPU AWS Batch compute environment (public outerbounds/metaflow/aws module),
# plus one S3 bucket for the DVC remote and MLflow artifacts and an ECR repository for the training image.

resource "random_string" "suffix" {
  length  = 6
  special = false
  upper   = false
}

locals {
  name = "${var.project}-${random_string.suffix.result}"
}

data "aws_availability_zones" "available" {
  state = "available"
}

# Private subnets for Batch and the metadata service, public subnets for the NAT gateway and load balancers.
module "vpc" {
  source  = "terraform-aws-modules/vpc/aws"
  version = "~> 5.8"

  name = local.name
  cidr = var.vpc_cidr
  azs  = slice(data.aws_availability_zones.available.names, 0, 2)

  private_subnets = [cidrsubnet(var.vpc_cidr, 4, 0), cidrsubnet(var.vpc_cidr, 4, 1)]
  public_subnets  = [cidrsubnet(var.vpc_cidr, 8, 200), cidrsubnet(var.vpc_cidr, 8, 201)]

  enable_nat_gateway   = true
  single_nat_gateway   = true
  enable_dns_hostnames = true
}

module "metaflow" {
  source  = "outerbounds/metaflow/aws"
  version = "~> 0.13"

  resource_prefix = var.project
  resource_suffix = random_string.suffix.result

  vpc_id          = module.vpc.vpc_id
  vpc_cidr_blocks = [module.vpc.vpc_cidr_block]
  subnet1_id      = module.vpc.private_subnets[0]
  subnet2_id      = module.vpc.private_subnets[1]
  with_public_ip  = var.with_public_ip

  access_list_cidr_blocks = var.access_list_cidr_blocks
  enable_step_functions   = var.enable_step_functions
  force_destroy_s3_bucket = var.force_destroy_buckets

  # GPU compute environment: EC2 (Fargate has no GPUs), scaled to zero when idle.
  batch_type                         = "ec2"
  compute_environment_instance_types = var.gpu_instance_types
  compute_environment_min_vcpus      = var.min_vcpus
  compute_environment_desired_vcpus  = var.min_vcpus
  compute_environment_max_vcpus      = var.max_vcpus

  tags = var.tags
}

# --- S3: DVC remote (s3://BUCKET/dvc) and MLflow artifacts (s3://BUCKET/mlflow) -------------------------------

resource "aws_s3_bucket" "artifacts" {
  bucket        = "${local.name}-artifacts"
  force_destroy = var.force_destroy_buckets
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Batch tasks (flow steps) read data and the DVC cache and may write MLflow artifacts directly.
data "aws_iam_policy_document" "batch_artifacts" {
  statement {
    sid       = "ListArtifactsBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid       = "ReadWriteArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }
}

resource "aws_iam_role_policy" "batch_artifacts" {
  name   = "${local.name}-artifacts-access"
  role   = regex("role/(.+)$", module.metaflow.METAFLOW_ECS_S3_ACCESS_IAM_ROLE)[0]
  policy = data.aws_iam_policy_document.batch_artifacts.json
}

# --- ECR: where the training image (infra/docker/Dockerfile) is pushed ---------------------------------------

resource "aws_ecr_repository" "train" {
  name                 = "${var.project}/train"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy_buckets

  image_scanning_configuration {
    scan_on_push = true
  }
}

resource "aws_ecr_lifecycle_policy" "train" {
  repository = aws_ecr_repository.train.name

  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 20 most recent images"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 20
      }
      action = { type = "expire" }
    }]
  })
}
