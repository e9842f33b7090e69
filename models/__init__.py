"""Face recognition models of the paper: VGG backbones returning the ECLoss target maps, and heads."""
from models.heads import ArcFaceHead, CosFaceHead, SoftmaxHead, build_head
from models.vgg import VGG_LAYERS, FaceNet, FaceOutput, build_model

__all__ = ["FaceNet", "FaceOutput", "VGG_LAYERS", "build_model", "build_head",
           "SoftmaxHead", "CosFaceHead", "ArcFaceHead"]
