"""Models: the architectures kdcache builds by name, teachers and students loaded from the forms users keep them in,
and the hidden-layer taps curriculum extraction reads. Registered architectures only, unless code is trusted."""

from kdcache.models.builders import (BasicBlock, CifarResNet, build_model, list_models, mlp, resnet8, resnet14,
                                     resnet20, resnet32, resnet44, resnet56, resnet110)
from kdcache.models.students import (Student, build_student, check_student_layers, save_student, student_family,
                                     truncate_layers)
from kdcache.models.teachers import (CHECKPOINT_FILE, MODEL_DIR_FILE, Teacher, load_teacher, save_model_dir,
                                     weights_sha256)

__all__ = ["BasicBlock", "CHECKPOINT_FILE", "CifarResNet", "MODEL_DIR_FILE", "Student", "Teacher", "build_model",
           "build_student", "check_student_layers", "list_models", "load_teacher", "mlp", "resnet8", "resnet14",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "save_model_dir", "save_student",
           "student_family", "truncate_layers", "weights_sha256"]
