"""Networks: frozen teachers, the skip-connected student decoder and the Skip-TS model."""

from .anatomy import ANATOMY_MASK_DEFAULTS, ANATOMY_METHODS, AnatomyMaskLayer, anatomy_mask_config
from .bottleneck import OneClassBottleneck, RD4ADStudent
from .detector import AnomalyDetector, decide
from .rd4ad import RD4AD
from .seg_head import SEG_HEAD_MODES, SegHead
from .skipts import (
    STUDENT_PRESETS,
    EncoderStudent,
    SkipTS,
    TeacherStudentModel,
    student_expansion,
    student_preset,
    teacher_name_of,
)
from .student import SKIP_LEVELS, SKIP_MODES, BasicBlock, Bottleneck, SkipStudent, UpBasicBlock, UpBottleneck
from .teacher import (
    OFFLINE_DEFAULT_TEACHER,
    TEACHERS,
    EfficientNetLiteTeacher,
    ResNetTeacher,
    TeacherEncoder,
    TeacherWeightsNotFound,
    build_teacher,
    feature_shapes,
    list_teachers,
    resolve_teacher_name,
    teacher_weights_available,
)
