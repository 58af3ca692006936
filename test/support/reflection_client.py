"""A reflection client as a Python user writes one (grpcio + protobuf's C++ descriptor pool, which
refuses a file whose imports are not in the pool): lists the services over grpc.reflection VERSION,
loads every file they need into a fresh pool, resolves every method's types, fetches files by their
real names, then calls CreateVm, ListVms and DeleteVm with classes made only from the reflected
descriptors. Prints one JSON summary; any failure is an exception (exit 1).

    python3 reflection_client.py TARGET VERSION
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

F = descriptor_pb2.FieldDescriptorProto


def message_class(descriptor):
    """The message class of a descriptor (GetMessageClass from protobuf 4.22 on, GetPrototype before)."""
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def reflection_messages():
    """The part of grpc.reflection's messages this client uses (field numbers from reflection.proto)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="reflection_client.proto", package="rc", syntax="proto3")

    def message(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Request", ("file_by_filename", 3, F.TYPE_STRING, opt, None), ("file_containing_symbol", 4, F.TYPE_STRING, opt, None), ("list_services", 7, F.TYPE_STRING, opt, None))
    message("Files", ("file_descriptor_proto", 1, F.TYPE_BYTES, rep, None))
    message("Service", ("name", 1, F.TYPE_STRING, opt, None))
    message("Services", ("service", 1, F.TYPE_MESSAGE, rep, ".rc.Service"))
    message("Error", ("error_code", 1, F.TYPE_INT32, opt, None), ("error_message", 2, F.TYPE_STRING, opt, None))
    message("Response", ("file_descriptor_response", 4, F.TYPE_MESSAGE, opt, ".rc.Files"), ("list_services_response", 6, F.TYPE_MESSAGE, opt, ".rc.Services"), ("error_response", 7, F.TYPE_MESSAGE, opt, ".rc.Error"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_class(pool.FindMessageTypeByName("rc." + n)) for n in ("Request", "Response")}


def main(target, version):
    rc = reflection_messages()
    channel = grpc.insecure_channel(target)
    info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo", request_serializer=lambda m: m.SerializeToString(), response_deserializer=rc["Response"].FromString)

    def ask(**request):
        (answer,) = list(info(iter([rc["Request"](**request)]), timeout=20))
        if answer.HasField("error_response"):
            raise LookupError(f"{request}: {answer.error_response.error_code} {answer.error_response.error_message}")
        return answer

    pool = descriptor_pool.DescriptorPool()
    loaded = set()

    def load(files):
        """Adds an answer's files to the strict pool, imports first; a missing import raises."""
        by_name = {}
        for raw in files:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            by_name[fdp.name] = (fdp, raw)

        def add(name):
            if name in loaded:
                return
            if name not in by_name:
                raise LookupError(f"the answer lacks {name}")
            fdp, raw = by_name[name]
            for dep in fdp.dependency:
                add(dep)
            pool.AddSerializedFile(raw)
            loaded.add(name)

        first = descriptor_pb2.FileDescriptorProto.FromString(files[0]).name
        add(first)
        return first

    services = [s.name for s in ask(list_services="*").list_services_response.service]
    methods = 0
    for name in services:
        load(ask(file_containing_symbol=name).file_descriptor_response.file_descriptor_proto)
        for m in pool.FindServiceByName(name).methods:
            pool.FindMessageTypeByName(m.input_type.full_name)
            pool.FindMessageTypeByName(m.output_type.full_name)
            methods += 1
    by_filename = {}
    for name in ("vcpud/v1/state.proto", "vcpud/v1/snapshot.proto", "google/rpc/error_details.proto"):
        by_filename[name] = load(ask(file_by_filename=name).file_descriptor_response.file_descriptor_proto)

    def unary(method, **fields):
        m = pool.FindServiceByName("vcpud.v1.VmService").methods_by_name[method]
        req_cls = message_class(m.input_type)
        res_cls = message_class(m.output_type)
        call = channel.unary_unary(f"/vcpud.v1.VmService/{method}", request_serializer=lambda r: r.SerializeToString(), response_deserializer=res_cls.FromString)
        return json_format.MessageToDict(call(req_cls(**fields), timeout=20), preserving_proto_field_name=True)

    created = unary("CreateVm", name="from-python", memory_bytes=2 << 20, vcpu_count=1)
    listed = unary("ListVms")
    unary("DeleteVm", vm_id=created["vm"]["id"])
    print(json.dumps({"services": services, "methods": methods, "files": sorted(loaded), "by_filename": by_filename, "created": created["vm"], "listed": [v["name"] for v in listed.get("vms", [])]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
