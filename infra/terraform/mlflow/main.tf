# MLflow tracking server on AWS: ECS Fargate service behind an Application Load Balancer,
# RDS PostgreSQL as backend store (connection string in Secrets Manager), S3 for artifacts (proxied by the server,
# so clients need no S3 credentials: `mlflow server --artifacts-destination s3://...`).

locals {
  name                  = "${var.project}-mlflow"
  container_port        = 5000
  artifacts_destination = "s3://${var.artifact_bucket_name}/${var.artifact_prefix}"
  https                 = var.certificate_arn != null
}

data "aws_s3_bucket" "artifacts" {
  bucket = var.artifact_bucket_name
}

# --- security groups: clients -> load balancer -> server -> database -----------------------------------------

resource "aws_security_group" "alb" {
  name_prefix = "${local.name}-alb-"
  description = "MLflow load balancer"
  vpc_id      = var.vpc_id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb_from_clients" {
  for_each = toset(var.allowed_cidr_blocks)

  security_group_id = aws_security_group.alb.id
  description       = "MLflow clients"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.https ? 443 : 80
  to_port           = local.https ? 443 : 80
}

resource "aws_vpc_security_group_egress_rule" "alb_to_server" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Forward to the MLflow tasks"
  referenced_security_group_id = aws_security_group.server.id
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

resource "aws_security_group" "server" {
  name_prefix = "${local.name}-server-"
  description = "MLflow server tasks"
  vpc_id      = var.vpc_id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "server_from_alb" {
  security_group_id            = aws_security_group.server.id
  description                  = "From the load balancer"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

resource "aws_vpc_security_group_egress_rule" "server_out" {
  security_group_id = aws_security_group.server.id
  description       = "S3, Secrets Manager, ECR, CloudWatch and the database"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_security_group" "db" {
  name_prefix = "${local.name}-db-"
  description = "MLflow backend store"
  vpc_id      = var.vpc_id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "db_from_server" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the MLflow server only"
  referenced_security_group_id = aws_security_group.server.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

# --- RDS PostgreSQL backend store ------------------------------------------------------------------------------

# Alphanumeric only: the password goes into a URI, where special characters would need percent-encoding.
resource "random_password" "db" {
  length  = 32
  special = false
}

resource "aws_db_subnet_group" "mlflow" {
  name       = local.name
  subnet_ids = var.private_subnet_ids
}

resource "aws_db_instance" "mlflow" {
  identifier_prefix = "${local.name}-"
  engine            = "postgres"
  engine_version    = var.db_engine_version
  instance_class    = var.db_instance_class

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_allocated_storage * 5
  storage_type          = "gp3"
  storage_encrypted     = true

  db_name  = "mlflow"
  username = "mlflow"
  password = random_password.db.result

  db_subnet_group_name   = aws_db_subnet_group.mlflow.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az

  backup_retention_period    = 7
  auto_minor_version_upgrade = true
  deletion_protection        = var.db_deletion_protection
  skip_final_snapshot        = !var.db_deletion_protection
  final_snapshot_identifier  = var.db_deletion_protection ? "${local.name}-final" : null
}

resource "aws_secretsmanager_secret" "backend_store_uri" {
  name_prefix = "${local.name}-backend-store-uri-"
  description = "MLFLOW_BACKEND_STORE_URI (PostgreSQL connection string) of the MLflow server"
}

resource "aws_secretsmanager_secret_version" "backend_store_uri" {
  secret_id     = aws_secretsmanager_secret.backend_store_uri.id
  secret_string = "postgresql://${aws_db_instance.mlflow.username}:${random_password.db.result}@${aws_db_instance.mlflow.address}:${aws_db_instance.mlflow.port}/${aws_db_instance.mlflow.db_name}?sslmode=require"
}

# --- IAM: execution role (pull image, read the secret, write logs) and task role (S3 artifacts) ---------------

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "execution" {
  name_prefix        = "${local.name}-exec-"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "read_backend_secret" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.backend_store_uri.arn]
  }
}

resource "aws_iam_role_policy" "execution_secret" {
  name   = "read-backend-store-uri"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.read_backend_secret.json
}

resource "aws_iam_role" "task" {
  name_prefix        = "${local.name}-task-"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "artifacts" {
  statement {
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [data.aws_s3_bucket.artifacts.arn]
  }

  statement {
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${data.aws_s3_bucket.artifacts.arn}/${var.artifact_prefix}/*"]
  }
}

resource "aws_iam_role_policy" "task_artifacts" {
  name   = "mlflow-artifacts"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.artifacts.json
}

# --- load balancer -----------------------------------------------------------------------------------------------

resource "aws_lb" "mlflow" {
  name               = substr(local.name, 0, 32)
  load_balancer_type = "application"
  internal           = var.load_balancer_internal
  subnets            = var.load_balancer_internal ? var.private_subnet_ids : var.public_subnet_ids
  security_groups    = [aws_security_group.alb.id]
  idle_timeout       = 300 # large artifact uploads go through the server
}

resource "aws_lb_target_group" "mlflow" {
  name_prefix = "mlflw-"
  port        = local.container_port
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = var.vpc_id

  health_check {
    path                = "/health"
    matcher             = "200"
    interval            = 15
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "http" {
  count = local.https ? 0 : 1

  load_balancer_arn = aws_lb.mlflow.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mlflow.arn
  }
}

resource "aws_lb_listener" "https" {
  count = local.https ? 1 : 0

  load_balancer_arn = aws_lb.mlflow.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mlflow.arn
  }
}

# --- ECS Fargate service -----------------------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "mlflow" {
  name              = "/ecs/${local.name}"
  retention_in_days = var.log_retention_days
}

resource "aws_ecs_cluster" "mlflow" {
  name = local.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_task_definition" "mlflow" {
  family                   = local.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  # The image's entrypoint is `mlflow server`; it reads --backend-store-uri and --artifacts-destination from
  # MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION, so the password never appears in the command.
  container_definitions = jsonencode([{
    name      = "mlflow"
    image     = var.mlflow_image
    essential = true
    command   = ["--host", "0.0.0.0", "--port", tostring(local.container_port), "--workers", tostring(var.workers)]
    portMappings = [{
      containerPort = local.container_port
      protocol      = "tcp"
    }]
    environment = [
      { name = "MLFLOW_ARTIFACTS_DESTINATION", value = local.artifacts_destination },
      { name = "MLFLOW_SERVER_ALLOWED_HOSTS", value = join(",", concat([aws_lb.mlflow.dns_name], var.hostnames)) },
    ]
    secrets = [
      { name = "MLFLOW_BACKEND_STORE_URI", valueFrom = aws_secretsmanager_secret.backend_store_uri.arn },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.mlflow.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "mlflow"
      }
    }
  }])
}

resource "aws_ecs_service" "mlflow" {
  name            = local.name
  cluster         = aws_ecs_cluster.mlflow.id
  task_definition = aws_ecs_task_definition.mlflow.arn
  desired_count   = var.desired_count
  launch_type     = "FARGATE"

  # First start creates the schema in PostgreSQL; give it time before the load balancer judges health.
  health_check_grace_period_seconds = 120

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.server.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.mlflow.arn
    container_name   = "mlflow"
    container_port   = local.container_port
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  depends_on = [aws_lb_listener.http, aws_lb_listener.https, aws_secretsmanager_secret_version.backend_store_uri]
}
