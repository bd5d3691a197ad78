"""The .proto sources, shipped as package data so that a team's protos can
import `holdfast/contract/v1/contract.proto` with no flag: `holdfast lint` and
`holdfast codegen` find this folder with importlib.resources."""
