from .cifar_resnet import CifarResNet
from .registry import create_model, list_models, load_state_dict_file, model_input, register_model

__all__ = ["CifarResNet", "create_model", "list_models", "load_state_dict_file", "model_input", "register_model"]
